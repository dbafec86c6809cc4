"""Using a trained model: `recognizer.Recognizer` (faces in images -> expressions), the
`fer_jax.predict` command's code (`predict`), export to StableHLO / SavedModel / TFLite
(`export`), and packing a finished run into the shipped weights (`save_pretrained`)."""

"""The network and what defines its numbers: the CBAM-ResNet18 (`resnet`, `cbam`, `layers`),
its CPU convolution forms (`conv`; oneDNN's, where built: `onednn_conv`) and BatchNorm
(`batch_norm`), the losses (`losses`: A-Softmax), its FLOP count (`flops`), and its weights in
other formats: PyTorch reference weights (`convert`) and the weights shipped in the package
(`pretrained`)."""

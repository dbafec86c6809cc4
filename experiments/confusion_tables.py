"""Tables 3 and 4 of the paper: row-normalised confusion matrices of the best model.

The model is CBAM (channel-first) + ResNet18 + A-Softmax, the last row of Table 1 (the same
workdir for the same settings, so it is trained once for Tables 1-4). Table 3: FER2013
PrivateTest, the checkpoint chosen on PublicTest. Table 4: JAFFE, pooled over the 5 CV folds.

Full settings (needs the built FER2013 and JAFFE datasets, see README):

    python -m experiments.confusion_tables --override=--config.data_dir=~/tensorflow_datasets \
        --override=--config.jaffe.manual_dir=/path/to/jaffedbase

CPU smoke run (generated data; the tables say it is not the paper's data):

    python -m experiments.confusion_tables --dataset=synthetic --width=8 --epochs=2 --cv_epochs=1

Writes experiments/results/confusion_tables_<dataset>/confusion_tables.{md,json},
table3_confusion.png and table4_confusion.png (heat maps, % per true class).
"""

from __future__ import annotations

import os

from experiments import common, paper_tables, provenance


def _matrix_part(
    results_dir: str, number: int, metrics: dict, title: str, plot_title: str
) -> list[str]:
    """Markdown of one confusion table plus its heat map, written as table<N>_confusion.png."""
    png = os.path.join(results_dir, f"table{number}_confusion.png")
    paper_tables.plot_confusion(metrics, png, plot_title)
    return [
        paper_tables.confusion_table(metrics, title),
        f"![table {number}]({os.path.basename(png)})",
    ]


def main(argv: list[str] | None = None) -> str:
    ap = common.parser(__doc__)
    paper_tables.add_run_flags(ap)
    args = ap.parse_args(argv)
    prov = provenance.provenance()
    row = paper_tables.BEST
    runs, records, figures = paper_tables.run_rows([row], args)
    fig = figures[row.key]
    results_dir = args.results_dir or os.path.join(
        paper_tables.REPO, "experiments", "results", f"confusion_tables_{args.dataset}"
    )
    os.makedirs(results_dir, exist_ok=True)
    fer_label, cv_label = paper_tables.column_labels(args.dataset)
    parts = [
        "# Tables 3 and 4: confusion matrices of CBAM + ResNet18 + A-Softmax",
        paper_tables.banner(args.dataset),
    ]
    matrices = {}
    res = fig["fer2013"]
    if res is None:
        parts.append(f"Table 3 ({fer_label}): no results.json in {runs[row.key].workdir}.")
    else:
        metrics = res[res["report_split"]]
        parts += _matrix_part(
            results_dir,
            3,
            metrics,
            f"Table 3: {fer_label} (epoch {res.get('selected_epoch')})",
            f"Table 3: {fer_label.split(',')[0]}\n{100 * metrics['accuracy']:.2f}%",
        )
        matrices["table3"] = metrics
    cv = fig["cv"]
    if cv is None:
        parts.append(
            f"Table 4 ({cv_label}): no cross_validation/summary.json in {runs[row.key].workdir}"
            " (JAFFE not available, or --no_cv)."
        )
    else:
        metrics = cv["pooled"]
        parts += _matrix_part(
            results_dir,
            4,
            metrics,
            f"Table 4: {cv_label}, pooled over {cv['folds']} folds ({cv['protocol']} protocol; "
            f"mean fold accuracy {100 * cv['mean_accuracy']:.2f} "
            f"± {100 * cv['std_accuracy']:.2f}%)",
            f"Table 4: {cv_label}\n{100 * metrics['accuracy']:.2f}% pooled",
        )
        matrices["table4"] = metrics
    parts.append(paper_tables.runs_section(records))
    records[row.key]["config"] = paper_tables.resolved_config(
        args.dataset, row.config_arg, paper_tables.overrides_from_args(args)
    )
    data = {
        "dataset": args.dataset,
        "settings": paper_tables.overrides_from_args(args),
        "runs": records,
        "matrices": matrices,
    }
    body = "\n\n".join(p for p in parts if p)
    path = paper_tables.write_results(results_dir, "confusion_tables", body, data, prov)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

"""Table 1 of the paper: ResNet18 / CBAM / A-Softmax on FER2013 and JAFFE, next to the paper.

Full settings (300 FER2013 epochs, 30 per JAFFE fold, width 64; needs the built FER2013 and
JAFFE datasets, see README):

    python -m experiments.table1 --override=--config.data_dir=~/tensorflow_datasets \
        --override=--config.jaffe.manual_dir=/path/to/jaffedbase

CPU smoke run (generated data, width 8, 2 epochs; the table says it is not the paper's data):

    python -m experiments.table1 --dataset=synthetic --width=8 --epochs=2 --cv_epochs=1

Rows: ResNet18 + softmax, CBAM + ResNet18 + softmax, CBAM + ResNet18 + A-Softmax (paper:
FER2013 72.4 / 73.1 / 73.5, JAFFE 97.6 / 98.4 / 98.9). Writes experiments/results/
table1_<dataset>/table1.{md,json}, table1_accuracy.png and the training curves of each run.
"""

from __future__ import annotations

from experiments import paper_tables


def main(argv: list[str] | None = None) -> str:
    return paper_tables.table_main("table1", __doc__, argv)


if __name__ == "__main__":
    main()

"""Table 2 of the paper: the order of CBAM's channel and spatial attention, next to the paper.

Full settings (needs the built FER2013 and JAFFE datasets, see README):

    python -m experiments.table2 --override=--config.data_dir=~/tensorflow_datasets \
        --override=--config.jaffe.manual_dir=/path/to/jaffedbase

CPU smoke run (generated data; the table says it is not the paper's data):

    python -m experiments.table2 --dataset=synthetic --width=8 --epochs=2 --cv_epochs=1

Rows (all with the A-Softmax head): channel-first, spatial-first, parallel (paper: FER2013
73.5 / 73.4 / 73.2, JAFFE 98.9 / 98.7 / 98.6). The channel-first run is the same job as
Table 1's last row (same workdir for the same settings: it is trained once). Writes
experiments/results/table2_<dataset>/.
"""

from __future__ import annotations

from experiments import paper_tables


def main(argv: list[str] | None = None) -> str:
    return paper_tables.table_main("table2", __doc__, argv)


if __name__ == "__main__":
    main()

"""The bias study: where can a method help the worst groups, and which methods reach that headroom?

    python -m benchmarks.bias [--data=headroom --out_dir=runs/bias_headroom --seeds=0,1,2,3,4]
    python -m benchmarks.bias --quick          # the same study, tiny (a few minutes; the tests run it)

The parts, in the order the study uses them:
- `data`: the data variants (headroom, demo), the study's settings (`Study`: epochs, grids) and
  the pre-training schedule;
- `arms`: what each arm trains (one `ArmKind` a line: its flags, its knobs, whether it reads
  per-sample tail labels) and `Arm`, one fine-tuning configuration;
- `runner`: trains run folders two at a time, resumably, and scores them;
- `selection`: every knob chosen on `val` with the first seed(s);
- `report`: paired differences on `test` with their intervals, the mechanism figures, the
  markdown report and the plot;
- `__main__`: the command.
A new arm is one `ArmKind` entry in `arms.py` (and its grid in `data.py`).
"""

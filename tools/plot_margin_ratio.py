"""The seed's Fig. 1: F(sigma) = [e^u + c]^sigma / (e^(sigma u) + c), u = s - m_bar, c = C - 1.

    python tools/plot_margin_ratio.py [--out margin_ratio.png --scale 64 --classes 80000 --margin_bar 19.2]

Prints F at a few sigma in 50-digit arithmetic and where Eq. 10's bound F <= 1 holds: F is
increasing and F(1) = 1, so the bound holds for sigma <= 1 and fails just above it.
"""

from __future__ import annotations

import decimal

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when run, so that importing margin_ratio defines none)."""
    flags.DEFINE_string("out", "margin_ratio.png", "Where to write the plot (PNG).")
    flags.DEFINE_float("scale", 64.0, "s.")
    flags.DEFINE_integer("classes", 80_000, "C, the number of classes.")
    flags.DEFINE_float("margin_bar", 19.2, "m_bar, the margin already multiplied by s (seed: 64 * 0.3).")

SHOWN = ("-1", "0", "0.5", "0.9", "1", "1.1", "2", "3")


def margin_ratio(sigma, scale=64.0, classes=80_000, margin_bar=19.2, digits: int = 50) -> decimal.Decimal:
    """F(sigma) computed with `digits` significant digits (float64 cannot see 1 + 1e-15)."""
    with decimal.localcontext() as context:
        context.prec = digits
        u = decimal.Decimal(str(scale)) - decimal.Decimal(str(margin_bar))
        c = decimal.Decimal(classes - 1)
        sigma = decimal.Decimal(str(sigma))
        numerator = (u.exp() + c) ** sigma  # exact for integral sigma: F(1) = 1 to the last digit
        return numerator / ((sigma * u).exp() + c)


def main(argv):
    del argv
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    arguments = (FLAGS.scale, FLAGS.classes, FLAGS.margin_bar)
    print(f"F(sigma) for s = {FLAGS.scale}, C = {FLAGS.classes}, m_bar = {FLAGS.margin_bar}")
    for sigma in SHOWN:
        value = margin_ratio(sigma, *arguments)
        verdict = "F <= 1: Eq. 10 holds" if value <= 1 else f"F - 1 = {value - 1:.3e}: Eq. 10 fails"
        print(f"  sigma = {sigma:>4}: F = {value:.20f}  ({verdict})")
    sigmas = [i / 100 for i in range(-300, 301)]
    values = [float(margin_ratio(sigma, *arguments, digits=30)) for sigma in sigmas]
    pyplot.figure(figsize=(5, 3.5))
    pyplot.plot(sigmas, values)
    pyplot.axvline(1.0, color="gray", linestyle=":")
    pyplot.xlabel("sigma")
    pyplot.ylabel("F(sigma)")
    pyplot.title(f"s = {FLAGS.scale:g}, C = {FLAGS.classes}, m_bar = {FLAGS.margin_bar:g}")
    pyplot.tight_layout()
    pyplot.savefig(FLAGS.out, dpi=120)
    print(f"plot written to {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

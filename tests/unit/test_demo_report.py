"""retro.demo.report: the summary makes no claim when the run is not informative; accuracy.png's axes."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from retro.demo.report import claims, figure, plot, summary_text

KS = (1, 2, 3, 4)


def _results(by_r: dict[int, float], static: float, pretrained: float) -> dict:
    """A demo results dict whose every k scores the model's mean (enough for claims, summary and plot)."""

    def model(means: dict[str, float], params: int) -> dict:
        return {
            "mean": means,
            "unique_parameters": params,
            "accuracy": {r: {str(k): a for k in KS} for r, a in means.items()},
        }

    results = {
        "models": {
            "recurrent": model({str(r): a for r, a in by_r.items()}, 400),
            "static": model({"static": static}, 500),
            "pretrained": model({"static": pretrained}, 500),
        },
        "flops": {"recurrent_final_mean": 4},
        "settings": {"shape": [2, 2, 2]},
    }
    results["claims"] = claims(results)
    return results


def test_a_non_informative_run_states_numbers_and_claims_nothing():
    # the seed-0 --quick run: everything at or near chance
    results = _results({1: 0.0875, 2: 0.0875, 4: 0.0875, 8: 0.0875, 16: 0.0875}, static=0.0875, pretrained=0.15)
    assert not results["claims"]["informative"]
    text = summary_text(results)
    assert text.startswith("NOT INFORMATIVE")
    for claim in ("matches or beats", "falls short of", "rises", "does not rise", "stays within", " vs "):
        assert claim not in text, claim
    assert "r=16: 8.8%" in text and "static at equal FLOPs 8.8%" in text and "pretrained 15.0%" in text


@pytest.mark.parametrize(("static", "verb"), [(0.45, "matches or beats"), (0.7, "falls short of")])
def test_an_informative_run_makes_the_comparison(static, verb):
    results = _results({1: 0.2, 2: 0.4, 4: 0.5, 8: 0.49, 16: 0.3}, static=static, pretrained=0.3)
    text = summary_text(results)
    assert "NOT INFORMATIVE" not in text
    assert f"it {verb} the static model at equal FLOPs (50.0% vs {100 * static:.1f}%" in text
    assert "it rises with r" in text and "up to r=8" in text


def test_accuracy_plot_has_integer_k_ticks(tmp_path):
    results = _results({1: 0.2, 2: 0.4, 4: 0.5}, static=0.45, pretrained=0.3)
    fig = figure(results)
    try:
        left, right = fig.axes[:2]
        lo, hi = right.get_xlim()
        shown = [t for t in right.get_xticks() if lo <= t <= hi]
        assert shown and all(float(t).is_integer() for t in shown), shown
        assert set(KS) <= {int(t) for t in shown}
        assert list(left.get_xticks()) == [1, 2, 4]  # r: the tested recurrences
    finally:
        plt.close(fig)
    plot(results, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

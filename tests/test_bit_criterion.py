"""The bit-width criterion (issue 11, point 4): Algorithm 3's acceptance test on hand-made cases,
its settings, the float/quantised test accuracies in results.json, and the paper's criterion
reproducing Algorithm 3 as before."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qpacknet.cli import main
from qpacknet.config import QuantizeConfig
from qpacknet.events import drive
from qpacknet.nets import build
from qpacknet.quantize import Criterion, ValFigures, kmeans_1d, search_bit_width, val_figures
from qpacknet.scenarios import PermutedDigits
from qpacknet.train import evaluate
from tests.helpers import trained_digits_worker

# A linear classifier on one-hot inputs: logits of x_i are column i of W. Both inputs are
# right with margin 2. One bit (k-means: {0, 0, 1, 1} -> 0.5 and {2, 2} -> 2) keeps both right
# with margin 1.5: the same accuracy, a higher loss. Two bits hold the three values exactly.
W = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
X = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
Y = torch.tensor([0, 1])


def _linear_figures(dense: dict[str, torch.Tensor]) -> ValFigures:
    return val_figures(X @ dense["fc0"].T, Y, (X @ W.T).argmax(-1))


def _search(name: str, delta: float = 1.0) -> tuple[int, list[tuple[int, ValFigures]]]:
    masks = {"fc0": torch.ones_like(W, dtype=torch.bool)}
    ref = _linear_figures({"fc0": W})
    res = search_bit_width({"fc0": W}, masks, _linear_figures, ref, 1, 8, Criterion(name, delta))
    return res.bits, res.tried


def test_val_figures_on_hand_computed_logits() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    fig = val_figures(logits, torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0]))
    assert fig.acc == 100.0 * 2 / 3
    assert fig.agreement == 100.0 / 3
    expected = (2 * math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 3
    assert fig.loss == pytest.approx(expected, abs=1e-12)
    # the float network's classes (reference) are all wrong; this one is right on inputs 0, 1
    assert (fig.discordant, fig.n) == (2, 3)
    assert fig.paired_se == pytest.approx(100.0 * math.sqrt(2) / 3)


def test_delta_se_passes_a_drop_within_chance_and_refuses_a_measurable_one() -> None:
    """``delta_se`` widens δ to k paired standard errors: 6000 validation inputs, 0.3 point
    lost. With 100 inputs changing sides the SE is 0.167 point, so 2 SE (0.33) let the drop
    through; with 18 (all of them losses) it is 0.071 point and 2 SE (0.14) refuse it, as δ
    alone (0.1) does."""
    ref = ValFigures(97.0, 0.1, 100.0, 0, 6000)
    noisy = ValFigures(96.7, 0.1, 99.0, 100, 6000)
    clear = ValFigures(96.7, 0.1, 99.7, 18, 6000)
    paper = Criterion("loss", delta=0.1)
    widened = Criterion("loss", delta=0.1, delta_se=2.0)
    assert noisy.paired_se == pytest.approx(100.0 * 10 / 6000)
    assert not paper.accepts(ref, noisy) and widened.accepts(ref, noisy)
    assert not widened.accepts(ref, clear)
    assert widened.allowed_drop(clear) == pytest.approx(2 * 100.0 * math.sqrt(18) / 6000)
    assert widened.allowed_drop(ValFigures(97.0, 0.1, 100.0, 1, 6000)) == 0.1  # never below δ
    assert "allowed drop 0.33" in widened.describe(ref, noisy)
    assert "allowed drop" not in paper.describe(ref, noisy)
    worse_loss = ValFigures(96.7, 0.2, 99.0, 100, 6000)
    assert not widened.accepts(ref, worse_loss), "the loss test still applies"


def test_one_bit_matches_float_accuracy_by_luck_and_the_loss_criterion_refuses_it() -> None:
    assert torch.equal(kmeans_1d(W.flatten(), 1).centroids, torch.tensor([0.5, 2.0]))
    bits, tried = _search("accuracy")
    assert bits == 1 and tried[0][1].acc == 100.0, "the paper's test accepts 1 bit"
    assert _search("agreement")[0] == 1, "no answer changes, so agreement cannot see it"
    bits, tried = _search("loss")
    assert bits == 2
    one, two = tried[0][1], tried[1][1]
    assert one.acc == 100.0 and one.agreement == 100.0
    assert one.loss == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-9)
    assert two.loss == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-9)


def test_agreement_counts_flips_that_cancel_in_accuracy() -> None:
    """1 bit: one right answer turns wrong and one wrong turns right (accuracy unchanged, half
    the answers changed); 2 bits change nothing."""
    weights = {"fc0": torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0])}
    masks = {"fc0": torch.ones(8, dtype=torch.bool)}
    ref = ValFigures(50.0, 0.7, 100.0)

    def figures(dense: dict[str, torch.Tensor]) -> ValFigures:
        exact = torch.equal(dense["fc0"], weights["fc0"])
        return ref if exact else ValFigures(50.0, 0.7, 50.0)

    runs = {
        name: search_bit_width(weights, masks, figures, ref, 1, 3, Criterion(name))
        for name in ("accuracy", "agreement")
    }
    assert runs["accuracy"].bits == 1
    assert runs["agreement"].bits == 2 and runs["agreement"].quant.agreement == 100.0


def test_every_criterion_keeps_the_paper_delta() -> None:
    """A width whose loss is lower but whose accuracy drops by more than δ is refused by every
    criterion; with no width accepted the search falls back to b_max and says so."""
    weights = {"fc0": torch.arange(4, dtype=torch.float32)}
    masks = {"fc0": torch.ones(4, dtype=torch.bool)}
    ref = ValFigures(90.0, 0.5, 100.0)
    worse = ValFigures(88.0, 0.4, 100.0)
    for name in ("accuracy", "loss", "agreement"):
        res = search_bit_width(weights, masks, lambda d: worse, ref, 1, 2, Criterion(name))
        assert (res.bits, res.within_delta) == (2, False), name
        looser = Criterion(name, delta=2.0)
        assert search_bit_width(weights, masks, lambda d: worse, ref, 1, 2, looser).bits == 1


def test_quantize_settings_default_and_bounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q = QuantizeConfig()
    assert (q.criterion, q.loss_tolerance, q.min_agreement, q.delta_se) == ("loss", 0.01, 99.0, 0)
    for args, needle in (
        (["quantize.criterion=bayes"], "quantize.criterion"),
        (["quantize.loss_tolerance=-0.1"], "quantize.loss_tolerance"),
        (["quantize.min_agreement=101"], "quantize.min_agreement"),
        (["quantize.delta_se=-1"], "quantize.delta_se"),
    ):
        code = main(["run", "--preset", "digits", "--out", str(tmp_path / "o"), "--set", *args])
        assert code == 2 and needle in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    q = QuantizeConfig(criterion="agreement", min_agreement=97.5)
    assert Criterion(q.criterion, q.delta, q.loss_tolerance, q.min_agreement).name == "agreement"


def test_paper_criterion_reproduces_algorithm_3_on_a_trained_network() -> None:
    """With ``criterion=accuracy`` the worker picks what Algorithm 3 written out with the
    training loop's own accuracy picks, from the same accuracies; its float test accuracy is the
    trained network's on the test split (reported only)."""
    worker, stream = trained_digits_worker(criterion="accuracy")
    assert worker.single is not None and worker.float_acc is not None
    weights, masks, state = worker.single.candidate(0)
    probe = build(worker.cfg.net, stream.input_shape, stream.num_classes, 1)
    expected: list[tuple[int, float]] = []
    for psi in range(1, 9):
        dense = {}
        for name, w in weights.items():
            d = torch.zeros_like(w)
            d[masks[name]] = kmeans_1d(w[masks[name]], psi).values()
            dense[name] = d
        probe.load_candidate(0, dense, masks, state)
        expected.append((psi, evaluate(probe, worker.val_split, 8192)[0]))
        if expected[-1][1] >= worker.float_acc - 0.5:
            break
    test = stream.test_split(0)
    float_test = evaluate(worker.single, test, 8192)[0]
    q = drive(worker.quantize(test), None)
    assert q.criterion == "accuracy" and q.float_acc == worker.float_acc
    assert [(b, a) for b, a, *_ in q.tried] == expected
    assert (q.bit_width, q.quant_acc) == expected[-1]
    assert q.float_test_acc == float_test != q.float_acc


def test_loss_criterion_on_a_trained_network_spends_no_fewer_bits() -> None:
    """The same trained network: the loss criterion accepts no narrower width than the paper's
    (it adds a test), and the width it accepts keeps the loss within the tolerance."""
    worker, stream = trained_digits_worker(criterion="accuracy")
    paper = drive(worker.quantize(stream.test_split(0)), None)
    worker, stream = trained_digits_worker(criterion="loss")
    q = drive(worker.quantize(stream.test_split(0)), None)
    assert q.bit_width >= paper.bit_width
    assert q.quant_loss <= q.float_loss + 0.01 and q.within_delta
    for _, acc, loss, *_ in q.tried[:-1]:
        assert loss > q.float_loss + 0.01 or acc < q.float_acc - 0.5


def test_delta_se_reaches_algorithm_3_and_spends_no_more_bits() -> None:
    """``quantize.delta_se`` from the config is the criterion QUANTIZE applies: every width
    tried reports ``max(δ, k·SE)`` as its allowed drop, computed from that width's own
    validation answers, and a wider allowance never accepts a wider width."""
    worker, stream = trained_digits_worker(criterion="accuracy")
    paper = drive(worker.quantize(stream.test_split(0)), None)
    worker, stream = trained_digits_worker(criterion="accuracy", delta_se=2.0)
    q = drive(worker.quantize(stream.test_split(0)), None)
    assert q.bit_width <= paper.bit_width
    assert [d for *_, d in paper.tried] == [0.5] * len(paper.tried)
    drops = [d for *_, d in q.tried]
    assert all(d >= 0.5 for d in drops) and drops[0] > 0.5  # 1 bit: many answers change
    assert q.quant_acc >= q.float_acc - drops[-1]


def test_results_json_reports_float_and_quantised_test_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["run", "--preset", "digits", "--executor", "local", "--no-tracking", "--quiet"]
    argv += ["--out", str(out), "--set", "threads=1"]
    for item in ("scenario.num_tasks=2", "search.population=2", "search.epochs=1"):
        argv += ["--set", item]
    assert main([*argv, "--set", "train.epochs=2"]) == 0
    res = json.loads((out / "results.json").read_text())
    n_test = len(PermutedDigits(num_tasks=1).test_split(0))
    for t, rep in enumerate(res["tasks"]):
        assert rep["criterion"] == "loss"
        assert rep["quant_test_acc"] == res["accuracy_matrix"][t][t]
        correct = rep["float_test_acc"] * n_test / 100.0
        assert 0 < correct < n_test and correct == pytest.approx(round(correct), abs=1e-9)
        assert rep["bits_tried"][-1] == {
            "bits": rep["bit_width"],
            "acc": rep["quant_acc"],
            "loss": rep["quant_loss"],
            "agreement": rep["agreement"],
            "allowed_drop": 1.0,  # δ; delta_se is off
        }
        assert rep["quant_loss"] <= rep["float_loss"] + 0.01 or not rep["within_delta"]

"""smolds curves: series read from metrics.jsonl (resumed steps: the last row wins), the PNG, the command."""

import json

from PIL import Image

from smolds.monitor.curves import main, panel_lines, plot_runs, read_series


def _run(path, rows):
    path.mkdir(parents=True)
    lines = [json.dumps(r) for r in rows] + ['{"kind": "train", "step": 9, "lo']  # a line cut by a crash
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _rows(losses, tokens_per_step=100, first=1):
    rows = [{"kind": "train", "step": first + i, "loss": v, "lr": 1e-3, "tokens": (first + i) * tokens_per_step,
             "time": 1.0} for i, v in enumerate(losses)]
    return rows + [{"kind": "eval", "step": first + len(losses) - 1, "loss": losses[-1] + 0.5}]


def test_series_last_row_wins_and_tokens(tmp_path):
    # Steps 1-3, then a resumed run that rewrote step 3 and went on to 4.
    run = _run(tmp_path / "a", _rows([5.0, 4.0, 3.5]) + _rows([3.0, 2.5], first=3))
    s = read_series(run)
    assert [(step, v) for step, _, v in s[("train", "loss")]] == [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.5)]
    assert [t for _, t, _ in s[("train", "loss")]] == [100, 200, 300, 400]
    assert s[("eval", "loss")] == [(3, 300, 4.0), (4, 400, 3.0)]
    assert ("train", "time") not in s and ("train", "step") not in s


def test_plot_and_command(tmp_path, capsys):
    a = _run(tmp_path / "mla", _rows([5.0, 4.0, 3.0]))
    b = _run(tmp_path / "linear", [{**r, "grad_norm": 1.5, "maxvio": 0.2} for r in _rows([5.1, 4.2, 3.3])])
    with Image.open(plot_runs([a, b], tmp_path / "cmp.png", x="tokens")) as im:
        assert im.size == (1350, 700)
    assert main([str(a)]) == 0 and (a / "curves.png").is_file()
    assert f"wrote {a / 'curves.png'}" in capsys.readouterr().out
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no metrics.jsonl" in err[0]


def test_mixture_runs_get_per_source_validation_lines(tmp_path):
    rows = _rows([5.0, 4.0])
    rows[-1].update({"loss/web": 4.2, "loss/code": 5.1})
    runs = [("mix", read_series(_run(tmp_path / "mix", rows))), ("one", read_series(_run(tmp_path / "one", _rows([5.0]))))]
    val = panel_lines(runs, "eval", "loss")
    assert [(label, ys, style) for label, _, ys, style in val] == [
        ("mix", [4.5], "-"), ("mix code", [5.1], "--"), ("mix web", [4.2], "--"), ("one", [5.5], "-")]
    assert [label for label, *_ in panel_lines(runs, "train", "loss")] == ["mix", "one"]  # other panels: one line a run
    with Image.open(plot_runs([tmp_path / "mix"], tmp_path / "mix.png")) as im:
        assert im.size == (1350, 700)

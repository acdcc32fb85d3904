"""run.sh stage 2's one decision (hdmole.train.pretrained.plan_base): the existing base, the
shipped one in pretrained/, or one trained here."""
from __future__ import annotations

from pathlib import Path

import pytest

from hdmole.bin import pretrained as cli
from hdmole.train.pretrained import plan_base

CORPUS = "hdmole-synth-1 default seed=0 plan=95a5399ee7c61e8e"
KEY = "tiny text_steps=0 cuts hdmole-synth-1 default seed=0 plan=95a5399ee7c61e8e conf=0123456789ab "


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    shipped = tmp_path / "pretrained"
    shipped.mkdir()
    (shipped / "CORPUS_VERSION").write_text(CORPUS + "\n", encoding="utf-8")
    return {"pretrained": shipped, "base_dir": tmp_path / "exp" / "base_model",
            "marker": tmp_path / "exp" / ".done" / "stage2"}


def plan(dirs, train_base="auto", model="tiny", pretrained=None, corpus=CORPUS):
    shipped = str(dirs["pretrained"]) if pretrained is None else pretrained
    return plan_base(train_base, model, shipped, corpus, dirs["base_dir"], dirs["marker"], KEY)


def finish_base(dirs, marker: str) -> None:
    (dirs["base_dir"] / "model").mkdir(parents=True)
    (dirs["base_dir"] / "model" / "done").write_text("x\n")
    dirs["marker"].parent.mkdir(parents=True)
    dirs["marker"].write_text(marker + "\n")  # as run_stage writes it


def test_auto_installs_the_shipped_base_that_matches_the_corpus(dirs):
    p = plan(dirs)
    assert p.decision == "shipped" and CORPUS in p.reason


def test_auto_trains_when_the_shipped_base_does_not_fit(dirs):
    other = CORPUS.replace("default", "ci")
    p = plan(dirs, corpus=other)
    assert p.decision == "train" and f"not '{other}'" in p.reason
    (dirs["pretrained"] / "CORPUS_VERSION").unlink()
    assert plan(dirs).decision == "train"  # not a shipped base directory
    assert plan(dirs, pretrained=str(dirs["pretrained"].parent / "missing")).decision == "train"
    assert plan(dirs, pretrained="").decision == "train"  # --pretrained "": never
    assert plan(dirs, model="paper").decision == "train"  # only the tiny model is shipped


def test_auto_keeps_an_up_to_date_own_base(dirs):
    finish_base(dirs, KEY)  # the trailing space of an empty --base-args included
    p = plan(dirs)
    assert p.decision == "train" and "up to date" in p.reason
    dirs["marker"].write_text(KEY.strip() + "\n")  # other settings: the shipped base again
    assert plan(dirs).decision == "shipped"
    dirs["marker"].write_text("pretrained 5265279a62c03476 " + CORPUS + "\n")  # installed before
    assert plan(dirs).decision == "shipped"


def test_true_retrains_and_false_needs_an_existing_base(dirs):
    assert plan(dirs, train_base="true").decision == "train"
    with pytest.raises(FileNotFoundError, match="no finished base model"):
        plan(dirs, train_base="false")
    finish_base(dirs, KEY)
    assert plan(dirs, train_base="true").decision == "train"
    for model in ("tiny", "paper"):
        assert plan(dirs, train_base="false", model=model).decision == "existing"
    with pytest.raises(ValueError, match="choose auto"):
        plan(dirs, train_base="yes")


def test_cli_prints_one_line_that_run_sh_reads(dirs, capsys):
    args = ["plan-base", "--train-base=auto", "--model=tiny", f"--pretrained={dirs['pretrained']}",
            f"--corpus={CORPUS}", f"--base-dir={dirs['base_dir']}", f"--marker={dirs['marker']}", f"--key={KEY}"]
    cli.main(args)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("shipped ")
    with pytest.raises(SystemExit) as e:
        cli.main([a if not a.startswith("--train-base") else "--train-base=false" for a in args])
    assert e.value.code == 1

"""One reader of optimizer arguments (``k=v,k=v``, JSON, a mapping) behind ``lowmem train``, ``bench``
and ``budget``: the same text gives the same dict through each of them."""

from __future__ import annotations

import json

import pytest

from lowmem.bench import _parse_optim_args, parse_variant
from lowmem.cli import main
from lowmem.optim.hparams import parse_optim_args, parse_value
from lowmem.trainers.hf import parse_optim_args as hf_parse_optim_args

CASES = [
    ("relative_step=False,lr=0.01", {"relative_step": False, "lr": 0.01}),
    ("relative_step=false, lr=1e-3", {"relative_step": False, "lr": 1e-3}),
    ("betas=[0.9,0.95],lr=1e-3", {"betas": (0.9, 0.95), "lr": 1e-3}),
    ("betas=(0.9, 0.95), weight_decay=0", {"betas": (0.9, 0.95), "weight_decay": 0}),
    ("rank=8,update_proj_gap=50,scale=0.25,proj_type=left", {"rank": 8, "update_proj_gap": 50, "scale": 0.25, "proj_type": "left"}),
    ("eps=[1e-30, 1e-3],clip_threshold=1.0", {"eps": (1e-30, 1e-3), "clip_threshold": 1.0}),
    ("target_modules=[q_proj, v_proj]", {"target_modules": ("q_proj", "v_proj")}),
    ("target_modules=.*(q_proj|v_proj)", {"target_modules": ".*(q_proj|v_proj)"}),
    ("foreach=None,beta1=null,lr=-2E-4", {"foreach": None, "beta1": None, "lr": -2e-4}),
    ("name='a,b'", {"name": "a,b"}),
    ('{"betas": [0.9, 0.95], "relative_step": false, "lr": 1e-3}', {"betas": (0.9, 0.95), "relative_step": False, "lr": 1e-3}),
    ("", {}),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0] or "empty" for c in CASES])
def test_parser_reads_yaml_scalars_sequences_and_json(text, expected):
    got = parse_optim_args(text)
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}  # 0.01 not '0.01', False not 'False'


@pytest.mark.parametrize("text,expected", [c for c in CASES if c[0] and not c[0].startswith("{")], ids=lambda c: str(c)[:30])
def test_train_bench_and_budget_read_the_same_dict(text, expected):
    assert hf_parse_optim_args(text) == expected  # lowmem train, TrainingArguments.optim_args, LowMemArguments
    assert parse_variant(f"adafactor:{text}") == ("adafactor", expected)  # lowmem bench NAME:k=v
    assert _parse_optim_args([f"adafactor:{text}"]) == {"adafactor": expected}  # lowmem bench --optim-args


def test_mapping_and_none():
    assert parse_optim_args(None) == {}
    assert parse_optim_args({"betas": [0.9, 0.95], "lr": 0.01}) == {"betas": (0.9, 0.95), "lr": 0.01}


@pytest.mark.parametrize("text,match", [
    ("lr", "not k=v"),
    ("lr=0.01,0.02", "not k=v"),                      # a list needs brackets
    ("betas=[0.9,0.95", "unclosed"),
    ("betas=0.9]", "unbalanced"),
    ("lr=", "empty value"),
    ("lr=1,lr=2", "given twice"),
    ("2lr=1", "not k=v"),
    ("{lr: 1", "JSON"),
])
def test_malformed_text_is_a_clear_error(text, match):
    with pytest.raises(ValueError, match=match):
        parse_optim_args(text)


def test_parse_value():
    assert parse_value(" 1e-3 ") == 1e-3 and parse_value("1.5E+2") == 150.0 and parse_value("3") == 3
    assert parse_value("True") is True and parse_value("off") is False  # YAML 1.1 booleans, as in recipe files
    assert parse_value("(1, [2, 3])") == (1, (2, 3))
    assert parse_value("adamw") == "adamw" and parse_value('"1e-3"') == "1e-3"


def test_budget_cli_reads_booleans_and_lists(capsys):
    """Used to fail: 'False' stayed a string (rejected by Adafactor) and betas=[0.9,0.95] split at its comma."""
    assert main(["budget", "tiny", "--optimizer", "adafactor", "--optim-args", "relative_step=False,lr=0.01", "--json",
                 "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["optim_args"] == {"relative_step": False, "lr": 0.01}
    assert main(["budget", "tiny", "--optimizer", "galore_adamw", "--optim-args", "betas=[0.9,0.95],rank=4,lr=1e-3",
                 "--json", "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["optim_args"] == {"betas": [0.9, 0.95], "rank": 4, "lr": 1e-3}


def test_bench_cli_reads_lists(monkeypatch, tmp_path):
    """Used to fail: ``adamw:betas=[0.9,0.95]`` split inside the brackets. The optimizers get the parsed values."""
    import lowmem.bench as bench

    seen = {}

    def fake_run_bench(names, optim_args=None, **kw):
        seen["variants"] = [parse_variant(n) for n in names]
        seen["optim_args"] = optim_args
        raise SystemExit(0)  # stop before training

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    with pytest.raises(SystemExit):
        main(["bench", "adamw:betas=[0.9,0.95],lr=1e-3", "adafactor", "--optim-args", "adafactor:relative_step=False,eps=[1e-30,1e-3]",
              "--steps", "8", "--repeats", "1", "--output-dir", str(tmp_path)])
    # (adafactor benched: --optim-args of a name not benched is refused, AUDCLI19 2)
    assert seen["variants"] == [("adamw", {"betas": (0.9, 0.95), "lr": 1e-3}), ("adafactor", {})]
    assert seen["optim_args"] == {"adafactor": {"relative_step": False, "eps": (1e-30, 1e-3)}}

"""SMALLS19 item 2: ``training_args.fsdp_config`` given as the path of a JSON file or as a JSON string (both accepted
by transformers' TrainingArguments) is read by ``check_fsdp_conflicts`` as transformers reads it, so FSDP's activation
checkpointing with ``gradient_checkpointing`` is refused before any model loads in every form (before: only a dict
was looked at; a path or a JSON string passed to transformers' Trainer, which raised after the model loaded)."""

import json

import pytest

from lowmem.config import ConfigError
from test_distfix_launch import fsdp_env  # noqa: F401 (fixture)

FORMS = ["dict", "json_string", "json_file", "yaml_json_file", "yaml_json_string"]


def _fsdp_config(form, tmp_path, config):
    if form == "dict":
        return config
    if form in ("json_string", "yaml_json_string"):
        return json.dumps(config)
    path = tmp_path / "fsdp_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def _recipe(form, tmp_path, config, **recipe):
    from lowmem.train import load_recipe

    value = _fsdp_config(form, tmp_path, config)
    out = str(tmp_path / "out")
    if form.startswith("yaml"):
        import yaml

        text = yaml.safe_dump({"optim": "adamw", "steps": 2, **recipe,
                               "training_args": {"fsdp": "full_shard", "fsdp_config": value}})
        (tmp_path / "r.yaml").write_text(text)
        return load_recipe(tmp_path / "r.yaml", output_dir=out)
    return load_recipe(None, optim="adamw", steps=2, output_dir=out, **recipe,
                       training_args={"fsdp": "full_shard", "fsdp_config": value})


@pytest.mark.parametrize("key", ["activation_checkpointing", "fsdp_activation_checkpointing"])
@pytest.mark.parametrize("form", FORMS)
def test_fsdp_config_activation_checkpointing_with_gradient_checkpointing_refused_in_every_form(
        tmp_path, fsdp_env, form, key):  # noqa: F811
    from lowmem.train import build_training_args

    recipe = _recipe(form, tmp_path, {"version": 2, key: True}, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=rf"^gradient_checkpointing: true \(the recipe\) and training_args.fsdp_config"
                                          rf"\.{key}=true both ask for activation checkpointing"):
        build_training_args(recipe)
    build_training_args(_recipe(form, tmp_path, {"version": 2, key: True}))  # FSDP's checkpointing alone builds
    # "false" as a string is off for transformers (str_to_bool), and for the check
    build_training_args(_recipe(form, tmp_path, {"version": 2, key: "false"}, gradient_checkpointing=True))


@pytest.mark.parametrize("value", [True, False, "true", "False", "1", "0", "yes", "off", 1, 0])
@pytest.mark.parametrize("form", ["dict", "json_string", "json_file"])
@pytest.mark.parametrize("keys", [("activation_checkpointing",), ("fsdp_activation_checkpointing",),
                                  ("activation_checkpointing", "fsdp_activation_checkpointing")])
def test_the_check_reads_what_transformers_reads(tmp_path, form, value, keys):
    """Whether FSDP's activation checkpointing is on: our reading == transformers' TrainingArguments' own
    (fsdp_plugin_args['activation_checkpointing']) for each form, truth spelling and key (both keys: the prefixed
    one wins; the plain one set to the opposite)."""
    from transformers import TrainingArguments

    from lowmem.train import fsdp_activation_checkpointing

    config = {"version": 2, keys[-1]: value}
    if len(keys) == 2:
        config[keys[0]] = "false" if str(value).lower() in ("true", "1", "yes") else "true"
    ours = fsdp_activation_checkpointing(_fsdp_config(form, tmp_path, config))
    args = TrainingArguments(output_dir=str(tmp_path / "o"), fsdp=True, fsdp_config=_fsdp_config(form, tmp_path, config),
                             use_cpu=True, report_to=[])
    assert (ours is not None) == args.fsdp_plugin_args["activation_checkpointing"], (config, ours)
    assert ours in (None, keys[-1])


def test_an_unreadable_fsdp_config_is_named(tmp_path):
    from lowmem.train import fsdp_activation_checkpointing, read_fsdp_config

    with pytest.raises(ConfigError, match=r"^training_args.fsdp_config='missing.json': cannot read the JSON file"):
        read_fsdp_config("missing.json")
    with pytest.raises(ConfigError, match=r"^training_args.fsdp_config='\{not json': not valid JSON"):
        read_fsdp_config("{not json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match=r"expected a JSON object, got list"):
        read_fsdp_config(str(tmp_path / "list.json"))
    with pytest.raises(ConfigError, match=r"^training_args.fsdp_config.activation_checkpointing='maybe': expected true"):
        fsdp_activation_checkpointing('{"activation_checkpointing": "maybe"}')
    assert read_fsdp_config(None) == {}

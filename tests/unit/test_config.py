"""The config tree: defaults are the paper's, loading is strict, errors name the key."""

import pytest

from atpo_megatron.cli import main
from atpo_megatron.config import Config, ConfigError, ParallelConfig, dump_config, load_config


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg.tree.initial_chains, cfg.tree.expansion_iterations, cfg.tree.top_k) == (10, 2, 6)
    assert cfg.tree.leaves_per_tree == 22 and cfg.tree.alpha == 0.05
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_response_tokens) == (2000, 6192)
    assert cfg.rollout.tool_call_limit == 6
    assert cfg.loss.clip_kwargs() == {"clip_low": 3e-3, "clip_high": 4e-3}
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (1e-6, 0.01, 1.0)
    assert (cfg.train.batch_prompts, cfg.train.mini_batch_prompts) == (64, 8)
    assert cfg.credit.value_mode == "child_softmax" and cfg.credit.adv_mode == "node_value"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tree:\n  top_k: 4\n  leaves_per_tree: 18\nloss:\n  name: grpo\n")
    cfg = load_config(path, ["optimizer.lr=2e-6", "loss.grpo.dual_clip=2", "data.train_files=[a.jsonl, b.jsonl]"])
    assert cfg.tree.top_k == 4 and cfg.loss.name == "grpo"
    assert cfg.optimizer.lr == 2e-6
    assert cfg.loss.clip_kwargs() == {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 2.0}
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    # partial nested override keeps the other fields of the section
    assert cfg.loss.grpo.clip_low == 0.2


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["tree.expansion_mode=random", "parallel.tp=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("tree.topk=3", "unknown key tree.topk; allowed keys here: alpha, expansion_iterations, expansion_mode"),
        ("nope.x=1", "unknown key nope"),
        ("tree.top_k=three", "tree.top_k='three' must be of type int"),
        ("loss.name=ppo", "loss.name='ppo' is not allowed; choose one of 'atpo', 'gspo', 'grpo'"),
        ("tree.expansion_mode=greedy", "choose one of 'entropy', 'random'"),
        ("rollout.max_response_tokens=-1", "rollout.max_response_tokens=-1 must not be negative"),
        ("tree.top_k=7", "tree.leaves_per_tree=22 must equal"),
        ("train.mini_batch_prompts=7", "must be a positive multiple of train.mini_batch_prompts=7"),
        ("parallel.vpp=2", "needs parallel.pp >= 2"),
        ("tree", "must look like key.sub=value"),
        ("tree=3", "tree must be a mapping"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_top_k_larger_than_any_tree_can_hold():
    with pytest.raises(ConfigError, match="exceeds the 3 non-leaf nodes"):
        load_config(None, ["tree.initial_chains=1", "rollout.tool_call_limit=2", "tree.top_k=4",
                           "tree.expansion_iterations=1", "tree.leaves_per_tree=5"])


def test_world_size_must_be_divisible_by_tp_pp():
    assert ParallelConfig(tp=2, pp=2).validate_world(8) == 2
    with pytest.raises(ConfigError, match=r"tp \* parallel.pp = 2\*2 = 4 does not divide the world size 6"):
        ParallelConfig(tp=2, pp=2).validate_world(6)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tree: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_config_show(capsys):
    assert main(["config", "show", "tree.alpha=0.1"]) == 0
    assert "alpha: 0.1" in capsys.readouterr().out
    assert main(["config", "show", "tree.alpha=oops"]) == 2
    assert "configuration error: tree.alpha='oops' must be of type float" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    from atpo_megatron.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: atpo " + name in capsys.readouterr().out
    assert Config() == load_config()


def test_every_example_config_loads():
    from pathlib import Path

    examples = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
    assert examples, "examples/ holds the YAML configs"
    for path in examples:
        load_config(path)


def _leaf_keys(cls, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_is_read_somewhere():
    """No config key that nothing reads (issue 13 defect 8: train.kl_coef and train.deterministic were
    accepted and ignored, so a user who set a KL coefficient silently trained without it).

    A key counts as read when the package (config.py aside) accesses it as an attribute; the loss
    sections' keys reach the loss functions as keyword arguments through ``LossConfig.clip_kwargs()``.
    """
    import inspect
    import re
    from pathlib import Path

    from atpo_megatron.algo.losses import TOKEN_LOSSES

    package = Path(__file__).parents[2] / "atpo_megatron"
    source = "\n".join(p.read_text() for p in package.rglob("*.py") if p.name != "config.py")
    unread = []
    for key in _leaf_keys(Config):
        section, name = key.split(".")[0], key.split(".")[-1]
        if section == "loss" and key.count(".") == 2:
            loss = key.split(".")[1]
            read = name in inspect.signature(TOKEN_LOSSES[loss]).parameters
        else:
            read = re.search(rf"\.{name}\b", source) is not None
        if not read:
            unread.append(key)
    assert unread == []


@pytest.mark.parametrize("key, why", [("train.kl_coef=0.001", "trains without a KL term"),
                                      ("train.deterministic=true", "never read")])
def test_removed_keys_say_why(key, why):
    with pytest.raises(ConfigError, match=rf"{key.split('=')[0]} was removed: .*{why}"):
        load_config(None, [key])

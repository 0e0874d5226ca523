"""The VLLM_SLEEP_EXT_* settings (vllm_sleep_ext/envs.py): one parser, the same words everywhere, and a
bad value that names the variable, the value and what is accepted (issue 16, item 5)."""

from __future__ import annotations

import pathlib
import re

import pytest

from vllm_sleep_ext import CuMemAllocator, envs
from vllm_sleep_ext.preserve import NEVER_PRESERVED_TAGS, PreserveMode

MiB = 1 << 20
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in envs.SETTINGS:
        monkeypatch.delenv(setting.name, raising=False)


def make(monkeypatch: pytest.MonkeyPatch, **env: str) -> CuMemAllocator:
    for name, value in env.items():
        monkeypatch.setenv(f"VLLM_SLEEP_EXT_{name}", value)
    return CuMemAllocator(backend="host", capacity_bytes=MiB)


# -- the parser ------------------------------------------------------------------------------------

@pytest.mark.parametrize("word, value", [(w, True) for w in ("1", "true", "YES", " On ")]
                         + [(w, False) for w in ("0", "False", "no", "OFF")])
def test_bool_words_are_the_same_for_every_variable(monkeypatch, word, value):
    for setting in (s for s in envs.SETTINGS if s.type == "bool"):
        monkeypatch.setenv(setting.name, word)
        assert envs.get(setting) is value, setting.name


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_means_the_default(monkeypatch, text):
    for setting in envs.SETTINGS:
        monkeypatch.setenv(setting.name, text)
        assert envs.get(setting) == setting.default, setting.name


@pytest.mark.parametrize("text, nbytes", [
    ("0", 0), ("4096", 4096), ("64M", 64 * MiB), ("64 MiB", 64 * MiB), ("2k", 2048), ("1G", 1 << 30),
    ("1gib", 1 << 30),
])
def test_byte_sizes_take_binary_suffixes(text, nbytes):
    assert envs.parse_bytes(text) == nbytes


@pytest.mark.parametrize("setting, text", [
    (envs.SLAB_BYTES, "-1"), (envs.SLAB_BYTES, "64MB"), (envs.SLAB_BYTES, "1.5G"), (envs.SLAB_BYTES, "lots"),
    (envs.RECLAIMABLE_PINNED_SHARE, "half"), (envs.RECLAIMABLE_PINNED_SHARE, "1.5"),
    (envs.RECLAIMABLE_PINNED_SHARE, "nan"), (envs.HOST_POLICY, "never"), (envs.PRESERVE, "everything"),
    (envs.KEEP_HOST, "maybe"), (envs.FILL_UNRESTORED, "2"), (envs.WAKE_WAIT_S, "-1"), (envs.WAKE_WAIT_S, "soon"),
    (envs.WAKE_WAIT_S, "inf"),
])
def test_a_bad_value_names_the_variable_the_value_and_what_is_accepted(monkeypatch, setting, text):
    monkeypatch.setenv(setting.name, text)
    with pytest.raises(envs.EnvError) as caught:
        envs.get(setting)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert setting.name in message and repr(text) in message and setting.accepted in message, message


def test_choices_ignore_case(monkeypatch):
    monkeypatch.setenv(envs.HOST_POLICY.name, " Reclaimable")
    assert envs.get(envs.HOST_POLICY) == "reclaimable"


# -- the allocator reads every setting through it ----------------------------------------------------

@pytest.mark.parametrize("word", ["false", "off", "no", "0"])
def test_fill_unrestored_false_words_leave_it_off(monkeypatch, word):
    # Today anything but "" and "0" turned it on, "false" included.
    assert make(monkeypatch, FILL_UNRESTORED=word).fill_unrestored is False
    assert make(monkeypatch, FILL_UNRESTORED="on").fill_unrestored is True


@pytest.mark.parametrize("word", ["false", "off", "no", "0"])
def test_prepare_host_false_words_turn_it_off(monkeypatch, word):
    # Today anything but "0" left it on, "false" included.
    assert make(monkeypatch, PREPARE_HOST=word).prepare_host is False
    assert make(monkeypatch, PREPARE_HOST="yes").prepare_host is True


def test_prime_reaches_the_core_option(monkeypatch):
    assert make(monkeypatch)._core.prime_after_release is True  # on by default
    assert make(monkeypatch, PRIME="off")._core.prime_after_release is False
    with pytest.raises(envs.EnvError, match="VLLM_SLEEP_EXT_PRIME='maybe'"):
        make(monkeypatch, PRIME="maybe")


def test_slab_bytes_takes_a_suffix(monkeypatch):
    assert make(monkeypatch, SLAB_BYTES="32M")._core.slab_bytes == 32 * MiB
    assert make(monkeypatch, SLAB_BYTES="0")._core.slab_bytes == 0


@pytest.mark.parametrize("name, value", [
    ("SLAB_BYTES", "-1"),
    ("SLAB_BYTES", "64MB"),
    ("SLAB_BYTES", "8G"),  # parses, but the core takes at most 4 GiB: its reason, our variable
    ("RECLAIMABLE_PINNED_SHARE", "half"),
    ("PRESERVE_TAGS", "weights,kv_cache"),  # parses, but kv_cache is never preserved
    ("PRESERVE", "all"),
    ("HOST_POLICY", "never"),
    ("KEEP_HOST", "maybe"),
])
def test_the_allocator_refuses_a_bad_setting_naming_the_variable(monkeypatch, name, value):
    # Today these failed with "invalid literal for int()", "could not convert string to float" or the
    # core's message, none of which names the variable.
    with pytest.raises(ValueError) as caught:
        make(monkeypatch, **{name: value})
    message = str(caught.value)
    assert f"VLLM_SLEEP_EXT_{name}={value!r}" in message and "accepted:" in message, message


def test_unset_settings_give_the_documented_defaults():
    alloc = CuMemAllocator(backend="host", capacity_bytes=MiB)
    assert alloc.preserve_mode == envs.PRESERVE.default
    assert alloc.preserve_tags == envs.PRESERVE_TAGS.default
    assert alloc.fill_unrestored is envs.FILL_UNRESTORED.default
    assert alloc.keep_host_backups is envs.KEEP_HOST.default and alloc.host_policy == "pinned"
    assert alloc.reclaimable_pinned_share == envs.RECLAIMABLE_PINNED_SHARE.default
    assert alloc._core.slab_bytes == envs.parse_bytes(envs.SLAB_BYTES.default_text)
    assert alloc.prepare_host is False, "off on the host backend"
    assert alloc.wake_wait_seconds == envs.WAKE_WAIT_S.default == 0


# -- one table ---------------------------------------------------------------------------------------

def test_every_variable_the_package_names_is_in_the_table():
    named = set()
    for path in (ROOT / "vllm_sleep_ext").glob("*.py"):
        named |= set(re.findall(r"VLLM_SLEEP_EXT_[A-Z_]+", path.read_text()))
    assert named <= {s.name for s in envs.SETTINGS}


def test_only_envs_reads_the_environment():
    # alloc_conf.py reads PyTorch's own PYTORCH_*ALLOC_CONF, not ours.
    sources = (ROOT / "vllm_sleep_ext").glob("*.py")
    readers = {p.name for p in sources if re.search(r"os\.environ|getenv", p.read_text())}
    assert readers <= {"envs.py", "alloc_conf.py"}


def test_table_agrees_with_the_code_it_describes():
    assert set(re.split(r", | or ", envs.PRESERVE.accepted)) == {m.value for m in PreserveMode}
    assert all(tag in envs.PRESERVE_TAGS.accepted for tag in NEVER_PRESERVED_TAGS)


def test_readme_lists_every_setting_as_the_table_does():
    readme = (ROOT / "README.md").read_text()
    assert envs.markdown_table() in readme, "README's settings table: python -m vllm_sleep_ext.envs"

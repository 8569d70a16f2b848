"""The facts every benchmark records (the command that ran it), and the adapter specs the quality scripts share."""

from __future__ import annotations

import sys

import pytest

from kvpacket_rag.benchmarks.common import machine_info, split_first_exact


@pytest.mark.parametrize("program", ["/usr/bin/kvpacket", "/repo/kvpacket_rag/__main__.py"])
def test_the_kvpacket_command_is_recorded_as_such(monkeypatch, program):
    monkeypatch.setattr(sys, "argv", [program, "bench", "serve", "--threads", "2"])
    assert machine_info(2)["command"] == "kvpacket bench serve --threads 2"


def test_another_program_is_recorded_as_it_ran(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/quality/frontier.py", "--threads", "2"])
    assert machine_info(2)["command"] == "benchmarks/quality/frontier.py --threads 2"


def test_first_exact_suffix_is_split_from_the_adapter_spec():
    assert split_first_exact("default@first-exact") == ("default", True)
    assert split_first_exact("none+preamble") == ("none+preamble", False)
    assert split_first_exact("runs/a.safetensors@first-exact") == ("runs/a.safetensors", True)

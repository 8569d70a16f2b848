"""The facts every benchmark records: the command that ran it."""

from __future__ import annotations

import sys

import pytest

from kvpacket_rag.benchmarks.common import machine_info


@pytest.mark.parametrize("program", ["/usr/bin/kvpacket", "/repo/kvpacket_rag/__main__.py"])
def test_the_kvpacket_command_is_recorded_as_such(monkeypatch, program):
    monkeypatch.setattr(sys, "argv", [program, "bench", "serve", "--threads", "2"])
    assert machine_info(2)["command"] == "kvpacket bench serve --threads 2"


def test_another_program_is_recorded_as_it_ran(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/quality/frontier.py", "--threads", "2"])
    assert machine_info(2)["command"] == "benchmarks/quality/frontier.py --threads 2"

"""``deltatune methods`` lists every registered method with its part kinds, capabilities and, for choice
fields, the choices (issue 9): discovered from the registry, not from a hand-written list."""

from __future__ import annotations

import typing
from dataclasses import fields

from rich.console import Console
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.config import describe_fields
from deltatune.methods import METHODS, get_method
from deltatune.parts.capabilities import CAPABILITIES


def test_every_method_is_listed_with_its_capabilities_and_choices(monkeypatch) -> None:
    import deltatune.cli as cli

    get_method("lora")  # imports the built-in methods
    monkeypatch.setattr(cli, "out", Console(width=400, highlight=False))  # no wrapping inside the table
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    for name, method in METHODS.items():
        assert method.part_kinds, f"{name} declares no part kinds"
        caps = method.capabilities()
        assert set(caps) == set(CAPABILITIES)
        line = next(ln for ln in res.output.splitlines() if ln.startswith("parts: ") and
                    ", ".join(k.kind for k in method.part_kinds) in ln)
        assert all(f"{c}={'yes' if v else 'no'}" in line for c, v in caps.items())
        hints = typing.get_type_hints(method.config_cls)
        for f in fields(method.config_cls):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                choices = ", ".join(str(c) for c in typing.get_args(hints[f.name]))
                assert f"one of: {choices}" in res.output, (name, f.name)


def test_choice_and_optional_types_are_readable() -> None:
    from dataclasses import dataclass

    @dataclass
    class Toy:
        mode: typing.Literal["a", "b"] = "a"
        limit: int | None = None
        name: str = "x"

    rows = {r[0]: r[1] for r in describe_fields(Toy)}
    assert rows == {"mode": "one of: a, b", "limit": "int | None", "name": "str"}

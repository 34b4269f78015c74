"""``pair check``'s values are pairvolchk -ss's (pairvol/cli/pair_check.py): the table, the
group's truth table, and the refusals."""

from __future__ import annotations

import pytest

from pairvol.cli import main
from pairvol.cli.pair_check import check_code, group_state
from replicator.errors import IllegalState
from replicator.pair_state import State

S = State
HORCM = {  # pairvolchk -ss, TrueCopy sync and async/UR, from the CCI reference
    ("primary", "sync"): {S.COPY: 22, S.PAIR: 23, S.PSUS: 24, S.PSUE: 25},
    ("secondary", "sync"): {S.COPY: 32, S.PAIR: 33, S.PSUS: 34, S.PSUE: 35},
    ("primary", "async"): {S.COPY: 42, S.PAIR: 43, S.PSUS: 44, S.PSUE: 45, S.PFUL: 47, S.PFUS: 48},
    ("secondary", "async"): {
        S.COPY: 52, S.PAIR: 53, S.PSUS: 54, S.PSUE: 55, S.PFUL: 57, S.PFUS: 58
    },
}  # fmt: skip


def test_every_state_has_pairvolchks_value_and_each_value_one_meaning() -> None:
    seen: dict[int, tuple[str, str, State]] = {}
    for (role, mode), table in HORCM.items():
        for state, value in table.items():
            assert check_code(role, state, mode) == value
    for role in ("primary", "secondary"):
        for mode in ("sync", "async"):
            for state in State:
                if mode == "sync" and state in (S.PFUL, S.PFUS):
                    with pytest.raises(IllegalState, match="never"):
                        check_code(role, state, mode)
                    continue
                value = check_code(role, state, mode)
                if state in (S.SMPL, S.SSWS):
                    assert value == {S.SMPL: 11, S.SSWS: {"sync": 37, "async": 59}[mode]}[state]
                    continue
                assert seen.setdefault(value, (role, mode, state)) == (role, mode, state)
                assert 11 <= value < 60 and value not in (20, 21)  # never an error's status


def test_a_groups_state_is_pairvolchks_truth_table() -> None:
    assert group_state([S.PAIR, S.COPY, S.PSUE]) is S.COPY
    assert group_state([S.PAIR, S.PSUE, S.PFUL]) is S.PSUE
    assert group_state([S.PAIR, S.PFUL, S.PFUS]) is S.PFUL
    assert group_state([S.PAIR, S.PFUS, S.PSUS]) is S.PAIR
    assert group_state([S.PSUS, S.PFUS]) is S.PFUS
    assert group_state([S.SSWS, S.PSUS]) is S.PSUS
    assert group_state([S.SSWS]) is S.SSWS
    assert group_state([]) is S.SMPL


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pair", "check"], "GROUP[/PAIR] or --volume"),
        (["pair", "check", "g/p", "--volume", "v", "--node", "/nonexistent"], "one of them"),
        (["pair", "check", "bad name/p", "--node", "/nonexistent"], "name"),
    ],
)
def test_bad_input_is_one_line_and_no_states_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err

"""The seed's six PIN-setting options, measured on one real run of the issuance saga.

One ``jpki pin-options report --json`` (two phones per option, the first of each slipping
once when typing a code) takes a fleet through the embedded stack; the tests read what the
observers on the SEs, the bus and the apps measured, and the marks derived from it.
"""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from jpki.cli import main
from jpki.pin_options import (
    HOLD_SHARE_DURING_ISSUANCE,
    SEED_MARKS,
    OptionMeasurement,
    derive_marks,
    render,
)
from orchestrator.flows.pin_options import STRATEGIES, Release, UserCode
from orchestrator.messages import PinOption
from workers.tsm.scripts import TEMPORARY_PIN_MODE

Opt = PinOption


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[PinOption, OptionMeasurement]:
    data_dir = tmp_path_factory.mktemp("pin-options")
    result = CliRunner().invoke(main, [
        "pin-options", "report", "--phones", "2", "--seed", "7", "--json",
        "--data-dir", str(data_dir),
    ])
    # Exit 1 would mean the invariant checker found a broken store after the run.
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["option"] for row in rows] == [1, 2, 3, 4, 5, 6]
    return {PinOption(row["option"]): OptionMeasurement(**row) for row in rows}


def test_every_option_issues(measured):
    assert {o: (m.issued, m.phones) for o, m in measured.items()} == {o: (2, 2) for o in Opt}


@pytest.mark.parametrize("option", [Opt.USER_TYPES_TEMPORARY, Opt.APP_TYPES_TEMPORARY])
def test_attack_with_the_temporary_pin_signs_in_options_1_and_2(measured, option):
    m = measured[option]
    assert m.attack_in_temporary_state
    assert "temporary_pin_set: auth TEMPORARY VERIFY 9000 SIGN 9000" in m.attack_detail
    # Signable from the moment the temporary PIN is set until the user's PIN replaces it.
    assert m.signable_window_s == m.temporary_window_s > 0


@pytest.mark.parametrize(
    ("option", "state"),
    [(Opt.BLOCKED_UNTIL_RELEASED, "TEMPORARY_BLOCKED"), (Opt.INITIAL_STATE, "INITIAL"),
     (Opt.PUK, "PUK_LOCKED")],
)
def test_attack_with_the_temporary_pin_fails_in_options_3_4_and_6(measured, option, state):
    m = measured[option]
    assert not m.attack_in_temporary_state
    # 6984: the PIN is held by the SP-TSM, no try spent; the key refuses to sign (6982).
    for kind in ("auth", "sign"):
        assert f"temporary_pin_set: {kind} {state} VERIFY 6984 SIGN 6982" in m.attack_detail


def test_option_4_released_pin_verifies_only_to_be_changed(measured):
    m = measured[Opt.INITIAL_STATE]
    assert "released: auth INITIAL_RELEASED VERIFY 9000 SIGN 6982" in m.attack_detail
    assert not m.attack_before_pin_change
    assert m.signable_window_s == 0 < m.temporary_window_s


def test_option_3_is_signable_only_between_release_and_the_pin_change(measured):
    m = measured[Opt.BLOCKED_UNTIL_RELEASED]
    assert m.attack_before_pin_change and not m.attack_in_temporary_state
    assert 0 < m.signable_window_s < m.temporary_window_s


def test_option_5_holds_the_real_pin_in_the_app_during_issuance(measured):
    five = measured[Opt.REAL_PIN_AT_APPLICATION]
    assert five.real_pin_hold_s > 0
    assert five.real_pin_hold_share > HOLD_SHARE_DURING_ISSUANCE
    for option in set(Opt) - {Opt.REAL_PIN_AT_APPLICATION}:
        assert measured[option].real_pin_hold_share < HOLD_SHARE_DURING_ISSUANCE
        assert measured[option].real_pin_hold_s < five.real_pin_hold_s / 10


def test_options_1_and_6_need_extra_user_actions(measured):
    extra = {o: m.extra_user_actions for o, m in measured.items()}
    assert extra[Opt.USER_TYPES_TEMPORARY] > 0 and extra[Opt.PUK] > 0
    assert all(extra[o] == 0 for o in set(Opt) - {Opt.USER_TYPES_TEMPORARY, Opt.PUK})


def test_a_mistyped_code_costs_a_try_and_only_where_the_user_types_one(measured):
    assert measured[Opt.USER_TYPES_TEMPORARY].mistype_cost.startswith(
        "1 PIN try spent per slip (2 left); 3 slips block it; then issued")
    assert measured[Opt.PUK].mistype_cost.startswith(
        "1 PUK try spent per slip (9 left); 10 slips block it; then issued")
    for option in (Opt.APP_TYPES_TEMPORARY, Opt.BLOCKED_UNTIL_RELEASED, Opt.INITIAL_STATE,
                   Opt.REAL_PIN_AT_APPLICATION):
        assert not measured[option].mistype_possible
        assert measured[option].mistype_cost == "not possible: nobody types a code"


def test_functions_each_option_needed(measured):
    assert "UNBLOCK PIN" in measured[Opt.BLOCKED_UNTIL_RELEASED].tsm_functions
    assert "TRANSITION PIN" in measured[Opt.INITIAL_STATE].tsm_functions
    assert "SET TEMPORARY PIN 04" in measured[Opt.PUK].tsm_functions
    assert measured[Opt.PUK].applet_functions == ["RESET RETRY COUNTER"]
    assert {o for o, m in measured.items() if m.new_tsm_function} == {
        Opt.BLOCKED_UNTIL_RELEASED, Opt.INITIAL_STATE}
    assert {o for o, m in measured.items() if m.new_applet_function} == {Opt.INITIAL_STATE}
    # Same saga for all: the option changes what runs in the scripts, not how many.
    assert {m.messages_added for m in measured.values()} == {0}
    assert {m.round_trips_added for m in measured.values()} == {0}
    assert measured[Opt.APP_TYPES_TEMPORARY].round_trips > 0


def test_derived_marks_match_the_seed_for_every_option(measured):
    derived = {o: (m.security, m.convenience, m.cost) for o, m in measured.items()}
    assert derived == SEED_MARKS
    assert {m.agreement for m in measured.values()} == {"agrees"}


def _synthetic(**changes) -> OptionMeasurement:
    base = dict(
        option=2, title="t", phones=1, issued=1, user_actions=9, extra_user_actions=0,
        code_typed_by_user=False, attack_in_temporary_state=False,
        attack_before_pin_change=False, attack_detail=[], signable_window_s=0.0,
        temporary_window_s=0.0, mistype_possible=False, mistype_cost="", real_pin_hold_s=0.0,
        real_pin_hold_share=0.0,
        tsm_functions=[], applet_functions=[], new_tsm_function=False,
        new_applet_function=False, messages=32, messages_added=0, round_trips=5,
        round_trips_added=0,
    )
    m = OptionMeasurement(**{**base, **changes})
    derive_marks(m)
    return m


def test_rules_follow_the_measurements_not_the_option_number():
    # Option 2's row, had its temporary PIN been unusable: the marks would say ◎.
    assert _synthetic().security == "◎"
    assert _synthetic(attack_in_temporary_state=True).security == "△"
    assert _synthetic(attack_in_temporary_state=True, code_typed_by_user=True).security == "×"
    assert _synthetic(code_typed_by_user=True).security == "○"
    assert _synthetic(real_pin_hold_share=0.5).security == "×"
    assert _synthetic(extra_user_actions=1).convenience == "×"
    assert _synthetic(new_tsm_function=True).cost == "△"
    assert _synthetic(round_trips_added=1).cost == "△"
    assert _synthetic(new_tsm_function=True, new_applet_function=True,
                      round_trips_added=1).cost == "×"
    assert _synthetic(attack_in_temporary_state=True,
                      new_tsm_function=True).agreement == "differs: cost"


def test_strategy_table_agrees_with_the_sp_tsm():
    assert {o: s.tsm_mode for o, s in STRATEGIES.items()} == dict(TEMPORARY_PIN_MODE)
    assert {o for o, s in STRATEGIES.items() if s.release is not Release.NOTHING} == {3, 4}
    assert STRATEGIES[Opt.USER_TYPES_TEMPORARY].user_code is UserCode.TEMPORARY_PIN
    assert STRATEGIES[Opt.PUK].user_code is UserCode.PUK


def test_report_table_beside_the_seed(measured):
    out = io.StringIO()
    render(measured, Console(file=out, width=200))
    text = out.getvalue()
    assert "◎ (seed ◎)" in text and "× (seed ×)" in text and "△ (seed △)" in text
    assert text.count("agrees") == 6
    assert "option 6 mistype: 1 PUK try spent per slip" in text

"""The fleet's profiles through the whole back end (embedded default): each ends with the
secure element, the TSM registry and the CA in the state the profile promises.

- new: the applet holds the owner's keys for exactly the chosen certificates;
- second-hand: the stranger's applet was deleted before the owner's was installed, and the
  stranger's phone certificates are revoked at the CA;
- reinstalled: the owner's own earlier applet was deleted first, the earlier certificates
  revoked, and only the new ones are live on this SE;
- unsupported: the SE was never touched.
"""

from __future__ import annotations

from pathlib import Path

from device_sim.fleet import applet_deleted_first
from device_sim.se.element import SecureElement
from device_sim.se.jpki_applet import GeneratedKeys, JpkiAppletFactory, Profile
from jpki.run import RunSettings, local_secret, run_embedded
from protocol import jpki
from workers.ca.authority import CertificateAuthority, Holder
from workers.ca.keystore import Passphrase
from workers.ca.revocation import Status
from workers.tsm.provisioning import jpki_load_file

KEY_EF = {"auth": jpki.EF.AUTH_KEY, "sign": jpki.EF.SIGN_KEY}


def _applet(data_dir: Path, device_id: str):
    load_files = [jpki_load_file(JpkiAppletFactory(Profile.PHONE, GeneratedKeys()))]
    element = SecureElement.load(data_dir / "phones" / f"{device_id}.se.json", load_files)
    app = next((a for a in element.manager.applications.values() if a.aid == jpki.AID), None)
    return element, None if app is None else app.applet


async def test_every_profile_ends_in_its_promised_state(tmp_path: Path) -> None:
    settings = RunSettings(
        phones=8,
        data_dir=tmp_path,
        seed=7,
        profile_mix="new=2,second_hand=2,reinstalled=2,unsupported=2",
        certificate_mix="both=2,auth=1,sign=1",
        key_pool=12,
    )
    outcome = await run_embedded(settings)
    assert outcome.audit == []
    authority = await CertificateAuthority.open(
        tmp_path, Passphrase(local_secret(tmp_path, "ca", "JPKI_CA_PASSPHRASE"))
    )
    try:
        for phone in outcome.phones:
            who = f"{phone['device_id']} ({phone['profile']})"
            element, applet = _applet(tmp_path, phone["device_id"])
            cin = element.identity.cin.hex().upper()
            if phone["profile"] == "unsupported":
                assert phone["outcome"] == "refused" and phone["scripts"] == [], who
                assert applet is None, who
                continue
            assert (phone["outcome"], phone["phase"]) == ("issued", 4), who
            chosen = {"both": {"auth", "sign"}}.get(phone["certificates"], {phone["certificates"]})
            assert applet is not None and applet.owner_reference() == phone["owner"], who
            held = {kind for kind, ef in KEY_EF.items() if applet.public_key(ef) is not None}
            assert held == chosen, who
            for kind in chosen:
                pin_ef = jpki.EF.AUTH_PIN if kind == "auth" else jpki.EF.SIGN_PIN
                assert applet.pin_status(pin_ef).state is jpki.PinState.SET, who
            live = [
                r
                for r in await authority.certificates(se_cin=cin, holder=Holder.PHONE)
                if r.status is not Status.REVOKED
            ]
            assert {r.cert_type.value for r in live} == chosen, who
            assert all(r.person_id == phone["owner"] for r in live), who
            if phone["profile"] == "new":
                assert not applet_deleted_first(phone["scripts"]), who
                continue
            assert applet_deleted_first(phone["scripts"]), who
            earlier_person = phone["previous_owner"] or phone["owner"]
            earlier = [
                r
                for r in await authority.certificates(person_id=earlier_person, holder=Holder.PHONE)
                if r.se_cin == cin and r.saga_id != live[0].saga_id
            ]
            assert earlier, f"{who}: no certificates from the earlier life of the phone"
            assert all(r.status is Status.REVOKED for r in earlier), who
            if phone["profile"] == "second_hand":
                assert phone["previous_owner"] != phone["owner"], who
    finally:
        await authority.close()

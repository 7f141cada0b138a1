"""A phone comes back online (``app.event.online``, sent by an idle app when it connects):
a phone whose certificates were revoked elsewhere — lost, failed, replaced by a new model,
its card renewed — cleans its applet now (FLOWS.md §4 "delete the applet when it is next
online"; the seed's rule that no keyed applet outlives its certificates).

1. The TSM inspects the SE (GET STATUS over SCP03: applet present, holds keys, whose).
2. If the applet holds keys, the CA says which phone certificates on this SE are live
   (valid or held: a temporarily lost phone keeps its applet).
3. None live: the TSM deletes the applet, keys with it; the app goes back to phase 1.
"""

from __future__ import annotations

import msgspec

from orchestrator.flows.ending import on_end
from orchestrator.flows.lifecycle_common import CA_RETRY, CA_TIMEOUT, SE_RETRY, SE_TIMEOUT, key
from orchestrator.lifecycle_messages import LifecycleFlow, LifecycleOutcome, LifecycleResult
from orchestrator.messages import CertificateKind, Online, SeIdentity
from orchestrator.saga import Flow, StepContext
from orchestrator.saga.machine import COMPLETED
from protocol.envelope import Message
from workers.ca import messages as ca
from workers.tsm import messages as tsm

FLOW_NAME = "lifecycle.online"


class OnlineData(msgspec.Struct, kw_only=True):
    device_id: str
    se: SeIdentity | None
    applet_holds_keys: bool = False
    owner_reference: str | None = None
    live: list[CertificateKind] = []
    checked: bool = False
    deleted: bool = False


def from_online(message: Message) -> OnlineData:
    online: Online = message.body
    return OnlineData(device_id=online.device_id, se=online.se)


online: Flow[OnlineData] = Flow(
    FLOW_NAME, OnlineData, deadline=5 * 60, device=lambda d: d.device_id,
    start_on=Online, initial=from_online,
)


def _se(data: OnlineData) -> SeIdentity:
    if data.se is None:  # guarded by every step's ``when``
        raise ValueError("no secure element")
    return data.se


@online.command(reply=tsm.InspectSeReply, timeout=SE_TIMEOUT, retry=SE_RETRY,
                when=lambda d: d.se is not None)
def s01_inspect(data: OnlineData, ctx: StepContext) -> tsm.InspectSe:
    """1. What the SE holds."""
    return tsm.InspectSe(command_id=key(ctx), device_id=data.device_id, se=_se(data))


@s01_inspect.done
def _(data: OnlineData, reply: tsm.InspectSeReply) -> None:
    data.applet_holds_keys = reply.applet_present and reply.holds_keys
    data.owner_reference = reply.owner_reference


@online.command(reply=ca.SeCertificates, timeout=CA_TIMEOUT, retry=CA_RETRY,
                when=lambda d: d.applet_holds_keys)
def s02_live_certificates(data: OnlineData, ctx: StepContext) -> ca.SeCertificatesQuery:
    """2. Which of this SE's certificates are live."""
    return ca.SeCertificatesQuery(command_id=key(ctx), se_cin=_se(data).cin)


@s02_live_certificates.done
def _(data: OnlineData, reply: ca.SeCertificates) -> None:
    data.live = sorted({CertificateKind(c.kind.value) for c in reply.certificates})
    data.checked = True


@online.command(reply=tsm.WipeAppletReply, timeout=SE_TIMEOUT, retry=SE_RETRY,
                when=lambda d: d.checked and not d.live)
def s03_delete_stale_applet(data: OnlineData, ctx: StepContext) -> tsm.WipeApplet:
    """3. Keys without a live certificate: delete the applet."""
    return tsm.WipeApplet(command_id=key(ctx), device_id=data.device_id, se=_se(data),
                          delete_applet=True)


@s03_delete_stale_applet.done
def _(data: OnlineData, reply: tsm.WipeAppletReply) -> None:
    data.deleted = reply.deleted


@on_end(FLOW_NAME)
def ending(data: OnlineData, status: str, reason: str | None) -> LifecycleResult | None:
    """Only a deleted applet is news to the phone (it goes back to phase 1)."""
    if status == COMPLETED and data.deleted:
        return LifecycleResult(flow=LifecycleFlow.ONLINE, outcome=LifecycleOutcome.DONE,
                               applet_deleted=True)
    return None

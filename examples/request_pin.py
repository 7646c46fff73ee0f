"""Publish one pin request (and print its trace id), as the API gateway would.

python examples/request_pin.py [CID] [--rf N] [--url nats://localhost:4222]
"""

from __future__ import annotations

import argparse
import uuid

import anyio

from gdc_worker import NATSConfig, NATSEventBus, PinRequestedEvent, new_pin_requested_event


async def request(config: NATSConfig, cid: str, rf: int) -> None:
    async with await NATSEventBus.connect(config) as bus:
        pin = PinRequestedEvent(cid=cid, size=1024, policies=[f"rf-{rf}"], requested_by="cli")
        event = new_pin_requested_event("api-gateway", pin, trace_id=uuid.uuid4().hex)
        seq = await bus.publish_event(event)
        where = f"seq {seq}" if seq is not None else "queued in the outbox"
        print(f"published pin.requested {event.id} for {cid} (trace {event.trace_id}, {where})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Publish a pin.requested event.")
    parser.add_argument("cid", nargs="?", default=f"Qm{uuid.uuid4().hex[:12]}")
    parser.add_argument("--rf", type=int, default=2, help="replication factor policy")
    parser.add_argument("--url", help="NATS URL (default: GDC_NATS_URL or localhost)")
    args = parser.parse_args()
    anyio.run(request, NATSConfig.from_env(url=args.url), args.cid, args.rf)


if __name__ == "__main__":
    main()

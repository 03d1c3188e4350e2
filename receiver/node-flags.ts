// Node flags for a long-running `tidemark-receiver serve`. The systemd unit
// (deploy/systemd/tidemark-receiver.service) passes them, and the test harness
// and the bench start serve with them, so that they measure what is deployed.
//
// --initial-old-space-size: serve keeps ~12 MB of live objects while tens of
// MiB/s of network buffers pass through it, and V8 then keeps the old
// generation so small that it ran a full mark-compact every ~70 ms under
// ingest (~65 per GiB), about a quarter of serve's CPU. With 128 MB there are
// ~8 per GiB: serve's CPU fell by ~25 % per GiB ingested and by ~45 % per GiB
// restored, for ~40 MiB more RSS. V8 reads the flag only when the process
// starts; it cannot be set from inside.
export const SERVE_NODE_FLAGS = ['--initial-old-space-size=128'];

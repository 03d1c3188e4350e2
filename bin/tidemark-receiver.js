#!/usr/bin/env -S node --initial-old-space-size=128
// Thin launcher: the TypeScript sources are compiled to dist/ by `npm ci` (the "prepare" script).
//
// --initial-old-space-size: serve keeps ~12 MB of live objects while tens of
// MiB/s of network buffers pass through it, and V8 then keeps the old
// generation so small that it ran a full mark-compact every ~70 ms under
// ingest (~65 per GiB), about a quarter of serve's CPU. With 128 MB there are
// ~8 per GiB: serve's CPU fell by ~25 % per GiB ingested and by ~45 % per GiB
// restored, for ~40 MiB more RSS. V8 reads the flag only when the process
// starts, hence the shebang (env -S: coreutils ≥ 8.30). The test harness runs
// every CLI with its launcher's flags (test/harness.ts launcherNodeFlags).
import '../dist/receiver/cli.js';

// Random-write load for the lag measurement, run as its own process so its
// synchronous writes never stall the bench's event loop:
//
//   node dist/bench/write-load.js FILE BYTES_PER_SECOND SECONDS
//
// Overwrites random 64 KiB-aligned pieces of FILE (which must exist, already
// written, so no allocation happens) at the given rate. Every 20 ms tick's
// writes are made durable by one fdatasync; a write counts as done when that
// fdatasync returns. Prints one JSON line: {"doneMs":[wall ms per write],"bytes":N}.
import { closeSync, fdatasyncSync, fstatSync, openSync, writeSync } from 'node:fs';
import { randomBytes, randomInt } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

const WRITE_BYTES = 64 * 1024;
const TICK_MS = 20;

async function main(): Promise<void> {
  const [file, rateArg, secondsArg] = process.argv.slice(2);
  const rate = Number(rateArg);
  const seconds = Number(secondsArg);
  if (!file || !(rate > 0) || !(seconds > 0)) throw new Error('usage: write-load FILE BYTES_PER_SECOND SECONDS');
  const fd = openSync(file, 'r+');
  const doneMs: number[] = [];
  try {
    const slots = Math.floor(fstatSync(fd).size / WRITE_BYTES);
    if (slots < 1) throw new Error(`${file} is smaller than one write`);
    const payload = randomBytes(WRITE_BYTES);
    const start = Date.now();
    let written = 0;
    while (Date.now() - start < seconds * 1000) {
      // Catch up to the schedule: by now `rate × elapsed` bytes should be written.
      const due = Math.floor((rate * (Date.now() - start)) / 1000 / WRITE_BYTES);
      const batch = due - written;
      if (batch > 0) {
        for (let i = 0; i < batch; i++) {
          payload.writeUInt32LE(written + i, 0); // each write differs, so no block looks unchanged
          writeSync(fd, payload, 0, WRITE_BYTES, randomInt(slots) * WRITE_BYTES);
        }
        fdatasyncSync(fd);
        const now = Date.now();
        for (let i = 0; i < batch; i++) doneMs.push(now);
        written += batch;
      }
      await sleep(TICK_MS);
    }
  } finally {
    closeSync(fd);
  }
  process.stdout.write(JSON.stringify({ doneMs, bytes: doneMs.length * WRITE_BYTES }) + '\n');
}

main().catch((err) => {
  process.stderr.write(`write-load: ${(err as Error).message}\n`);
  process.exitCode = 1;
});

// Load generator for the native continuous-replication tests, run as a child process:
//
//   node dist/native-tests/workload.js --dir MOUNTPOINT --log LOGFILE --seconds N
//       [--db-log FILE] [--rate RECORDS_PER_S] [--max-mib M] [--tx-every K] [--mode normal|bulk]
//       [--bulk-mib M] [--bulk-writes W] [--nice N]
//
// mode normal (default):
//   - appends numbered 4 KiB records to DIR/records.dat (O_APPEND), fsync after each one,
//     then appends "NUMBER WALLCLOCK_MS" to LOGFILE (which lives outside the protected disk);
//   - every K records (interleaved, same process) one SQLite transaction on DIR/db.sqlite
//     (WAL, synchronous=FULL): insert a row, increment the counter; after COMMIT returns,
//     appends "TXN WALLCLOCK_MS" to the db log (default LOGFILE.db). Transaction i sets the
//     counter to i (1-based).
//   - paced to at most --rate records per second (default 200) and at most --max-mib of
//     records (default 32); stops by itself after --seconds, or at SIGTERM/SIGINT.
// mode bulk: many small random rewrites of DIR/bulk.dat (--bulk-mib, default 8) with a
//   fdatasync after each --bulk-writes (default 64) 4 KiB writes: a flood of block events.
// mode chain (--device DEV instead of --dir): ordered writes straight to a block device,
//   write k (O_DSYNC, so it completes before k+1 is issued) to slot chainSlotOf(k) of
//   --slots (default 64, a power of two), slots --stride bytes apart (default 128 KiB); in
//   bursts of 0-40 ms with pauses of 0-40 ms. Each lap of --slots writes hits every slot
//   once, in a scrambled order, so a reader sweeping the slots in order can pick up a
//   write and miss an earlier one. Any crash-consistent image holds a prefix of the chain
//   (see chainGap).
//
// Record layout (RECORD_BYTES): "TMREC001" | u64le number | u64le wall ms at write |
// payload derived from the number | sha256 of everything before it (last 32 bytes).
// On exit it prints one JSON line: {"event":"workload-done","records":N,"transactions":M,...}.
import { closeSync, constants, fdatasyncSync, fsyncSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { setPriority } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import Database from 'better-sqlite3';

export const RECORD_BYTES = 4096;
export const RECORD_MAGIC = Buffer.from('TMREC001', 'latin1');
const DIGEST_OFFSET = RECORD_BYTES - 32;

/** The record numbered n, written at wall time ms. */
export function makeRecord(n: number, ms: number): Buffer {
  const record = Buffer.alloc(RECORD_BYTES);
  RECORD_MAGIC.copy(record, 0);
  record.writeBigUInt64LE(BigInt(n), 8);
  record.writeBigUInt64LE(BigInt(ms), 16);
  // Payload: xorshift32 stream seeded by the number (distinct content per record).
  let x = (n * 2654435761 + 1) >>> 0 || 1;
  for (let off = 24; off + 4 <= DIGEST_OFFSET; off += 4) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    record.writeUInt32LE(x, off);
  }
  createHash('sha256').update(record.subarray(0, DIGEST_OFFSET)).digest().copy(record, DIGEST_OFFSET);
  return record;
}

/** The number of a record slot if it is a well-formed record (magic and checksum), else undefined. */
export function parseRecord(slot: Buffer): number | undefined {
  if (slot.length !== RECORD_BYTES || !slot.subarray(0, 8).equals(RECORD_MAGIC)) return undefined;
  const digest = createHash('sha256').update(slot.subarray(0, DIGEST_OFFSET)).digest();
  if (!digest.equals(slot.subarray(DIGEST_OFFSET))) return undefined;
  return Number(slot.readBigUInt64LE(8));
}

const CHAIN_MAGIC = Buffer.from('TMCHAIN1', 'latin1');
const CHAIN_SLOT_BYTES = 4096;

/** Chain write k: magic | u64le k | sha256 of both. */
function makeChainSlot(k: number): Buffer {
  const slot = Buffer.alloc(CHAIN_SLOT_BYTES);
  CHAIN_MAGIC.copy(slot, 0);
  slot.writeBigUInt64LE(BigInt(k), 8);
  createHash('sha256').update(slot.subarray(0, 16)).digest().copy(slot, 16);
  return slot;
}

/** The chain write each slot of an image holds (undefined: never written), from the slots' bytes. */
export function chainSlots(image: Buffer, slots: number, stride: number): Array<number | undefined> {
  return Array.from({ length: slots }, (_, b) => {
    const slot = image.subarray(b * stride, b * stride + CHAIN_SLOT_BYTES);
    if (!slot.subarray(0, 8).equals(CHAIN_MAGIC)) return undefined;
    const digest = createHash('sha256').update(slot.subarray(0, 16)).digest();
    return digest.equals(slot.subarray(16, 48)) ? Number(slot.readBigUInt64LE(8)) : undefined;
  });
}

/** The slot chain write k goes to: an odd multiplier permutes each lap of `slots` (a power of two). */
export function chainSlotOf(k: number, slots: number): number {
  return ((k % slots) * 167) % slots;
}

/** The newest chain write the slots hold; -1 when they hold none. */
export function newestChainWrite(held: Array<number | undefined>): number {
  return Math.max(-1, ...held.map((k) => k ?? -1));
}

/**
 * Why the slots are not a prefix of the chain (writes 0..m for some m), or null when they
 * are: then each slot holds the newest write k ≤ m that went to it.
 */
export function chainGap(held: Array<number | undefined>): string | null {
  const m = newestChainWrite(held);
  const expected: Array<number | undefined> = held.map(() => undefined);
  for (let k = Math.max(0, m - held.length + 1); k <= m; k++) expected[chainSlotOf(k, held.length)] = k;
  for (const [b, k] of held.entries()) {
    if (k !== expected[b]) return `slot ${b} holds write ${k ?? 'none'}, but the newest write present is ${m}, so it must hold ${expected[b] ?? 'none'}`;
  }
  return null;
}

/** Lines "N MS" of a workload log → ms indexed by N (sparse if lines are missing). */
export function parseLog(text: string): number[] {
  const times: number[] = [];
  for (const line of text.split('\n')) {
    const m = /^(\d+) (\d+)$/.exec(line.trim());
    if (m) times[Number(m[1])] = Number(m[2]);
  }
  return times;
}

function numberOption(value: string | undefined, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a non-negative number (got ${value})`);
  return n;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      dir: { type: 'string' }, log: { type: 'string' }, seconds: { type: 'string' }, 'db-log': { type: 'string' },
      rate: { type: 'string' }, 'max-mib': { type: 'string' }, 'tx-every': { type: 'string' }, mode: { type: 'string' },
      'bulk-mib': { type: 'string' }, 'bulk-writes': { type: 'string' }, nice: { type: 'string' },
      device: { type: 'string' }, slots: { type: 'string' }, stride: { type: 'string' },
    },
  });
  const chain = values.mode === 'chain';
  if (!values.seconds || (chain ? !values.device : !values.dir || (values.mode !== 'bulk' && !values.log))) {
    throw new Error('usage: workload (--dir MOUNTPOINT --log LOGFILE [--mode normal|bulk] | --device DEV --mode chain) --seconds N [...]');
  }
  const seconds = numberOption(values.seconds, 'seconds', 0);
  const nice = numberOption(values.nice, 'nice', 5);
  try {
    setPriority(nice); // leave the CPU to the agent first (2 cores)
  } catch {
    // not fatal
  }
  let stopping = false;
  const stop = () => void (stopping = true);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const deadline = Date.now() + seconds * 1000;
  const running = () => !stopping && Date.now() < deadline;

  if (chain) {
    const slots = numberOption(values.slots, 'slots', 64);
    if (!Number.isInteger(Math.log2(slots))) throw new Error(`--slots must be a power of two (got ${slots})`);
    const stride = numberOption(values.stride, 'stride', 128 * 1024);
    const fd = openSync(values.device!, constants.O_WRONLY | constants.O_DSYNC);
    let writes = 0;
    while (running()) {
      const burstEnd = Date.now() + Math.random() * 40;
      while (Date.now() < burstEnd) {
        writeSync(fd, makeChainSlot(writes), 0, CHAIN_SLOT_BYTES, chainSlotOf(writes, slots) * stride);
        writes++;
      }
      await sleep(Math.random() * 40);
    }
    closeSync(fd);
    process.stdout.write(JSON.stringify({ event: 'workload-done', mode: 'chain', writes }) + '\n');
    return;
  }

  if (values.mode === 'bulk') {
    const mib = numberOption(values['bulk-mib'], 'bulk-mib', 8);
    const writesPerSync = Math.max(1, Math.floor(numberOption(values['bulk-writes'], 'bulk-writes', 64)));
    const blocks = Math.max(1, Math.floor((mib * 1024 * 1024) / 4096));
    const fd = openSync(join(values.dir!, 'bulk.dat'), 'w');
    ftruncateSync(fd, blocks * 4096);
    const buf = Buffer.alloc(4096);
    let writes = 0;
    let x = 0x9e3779b9;
    const next = () => {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      return x;
    };
    while (running()) {
      for (let i = 0; i < writesPerSync; i++) {
        buf.writeUInt32LE(next(), 0);
        buf.writeUInt32LE(writes, 4);
        writeSync(fd, buf, 0, buf.length, (next() % blocks) * 4096);
        writes++;
      }
      fdatasyncSync(fd);
      await sleep(0); // let SIGTERM in
    }
    closeSync(fd);
    process.stdout.write(JSON.stringify({ event: 'workload-done', mode: 'bulk', writes }) + '\n');
    return;
  }

  const rate = numberOption(values.rate, 'rate', 200);
  const maxRecords = Math.floor((numberOption(values['max-mib'], 'max-mib', 32) * 1024 * 1024) / RECORD_BYTES);
  const txEvery = Math.max(1, Math.floor(numberOption(values['tx-every'], 'tx-every', 5)));
  const logFd = openSync(values.log!, 'a');
  const dbLogFd = openSync(values['db-log'] ?? `${values.log}.db`, 'a');
  const recordsFd = openSync(join(values.dir!, 'records.dat'), 'a');
  const db = new Database(join(values.dir!, 'db.sqlite'));
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.exec(`CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
           CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, record INTEGER NOT NULL, ms INTEGER NOT NULL, payload BLOB NOT NULL);
           INSERT OR IGNORE INTO counter (id, n) VALUES (1, 0);`);
  const insert = db.prepare('INSERT INTO rows (record, ms, payload) VALUES (?, ?, ?)');
  const bump = db.prepare('UPDATE counter SET n = n + 1 WHERE id = 1');
  const read = db.prepare('SELECT n FROM counter WHERE id = 1').pluck();
  const transaction = db.transaction((record: number, ms: number) => {
    insert.run(record, ms, makeRecord(record, ms).subarray(24, 24 + 600));
    bump.run();
    return read.get() as number;
  });
  fsyncSync(recordsFd);

  const started = Date.now();
  let records = 0;
  let transactions = 0;
  while (running()) {
    if (records < maxRecords) {
      writeSync(recordsFd, makeRecord(records, Date.now()));
      fsyncSync(recordsFd);
      writeSync(logFd, `${records} ${Date.now()}\n`);
      records++;
    }
    if (records % txEvery === 0 || records >= maxRecords) {
      const n = transaction(records, Date.now());
      writeSync(dbLogFd, `${n} ${Date.now()}\n`);
      transactions = n;
    }
    // Pacing: never ahead of `rate` records per second; always yield so signals and the agent get in.
    const aheadMs = started + (records * 1000) / (rate || Infinity) - Date.now();
    await sleep(records >= maxRecords ? Math.max(aheadMs, 20) : Math.max(0, aheadMs));
  }
  db.close();
  closeSync(recordsFd);
  closeSync(logFd);
  closeSync(dbLogFd);
  process.stdout.write(JSON.stringify({ event: 'workload-done', mode: 'normal', records, transactions, seconds: (Date.now() - started) / 1000 }) + '\n');
}

// Run only as a program (the test imports the record helpers).
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`workload: ${(err as Error).message}\n`);
    process.exitCode = 1;
  });
}

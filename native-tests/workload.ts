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
//
// Record layout (RECORD_BYTES): "TMREC001" | u64le number | u64le wall ms at write |
// payload derived from the number | sha256 of everything before it (last 32 bytes).
// On exit it prints one JSON line: {"event":"workload-done","records":N,"transactions":M,...}.
import { closeSync, fdatasyncSync, fsyncSync, ftruncateSync, openSync, writeSync } from 'node:fs';
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
    },
  });
  if (!values.dir || !values.seconds || (values.mode !== 'bulk' && !values.log)) {
    throw new Error('usage: workload --dir MOUNTPOINT --log LOGFILE --seconds N [--mode normal|bulk] [...]');
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

  if (values.mode === 'bulk') {
    const mib = numberOption(values['bulk-mib'], 'bulk-mib', 8);
    const writesPerSync = Math.max(1, Math.floor(numberOption(values['bulk-writes'], 'bulk-writes', 64)));
    const blocks = Math.max(1, Math.floor((mib * 1024 * 1024) / 4096));
    const fd = openSync(join(values.dir, 'bulk.dat'), 'w');
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
  const recordsFd = openSync(join(values.dir, 'records.dat'), 'a');
  const db = new Database(join(values.dir, 'db.sqlite'));
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

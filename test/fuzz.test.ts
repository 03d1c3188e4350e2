// Hostile input (issue 6, promise 6): a seeded protocol fuzzer against a live
// receiver. Over 10,000 cases:
//   - semantic cases on authenticated sessions, many per connection: wrong order
//     (blocks.put / point.commit of points never begun), other hosts' and other
//     vaults' point, disk and chunk ids, refused roles — each must get an error
//     reply (the expected code), never data of another host or vault;
//   - frame cases, each on its own authenticated connection: random bytes, truncated
//     frames, valid requests with mutated fields (wrong types, huge, negative, NaN,
//     oversized arrays, wrong-length ids), hostile msgpack (huge declared lengths,
//     deep nesting), text frames, WebSocket-level violations (reserved bits and
//     opcodes, unmasked, fragmented control frames), oversized frames — each must get
//     a protocol error frame and a close (or just a close), or, when the mutation left
//     a valid request, a reply;
//   - upgrade cases without a session: wrong protocol version, paths, credentials,
//     broken WebSocket handshakes, garbage HTTP, plain TCP garbage — each must get an
//     HTTP refusal or a close.
// Throughout, the receiver's RSS (VmRSS) stays under 300 MiB and the process stays up;
// afterwards committed data is intact and a normal sync and restore work. Also: a frame
// header claiming a huge length is refused (1009) before any allocation, and 300 idle
// connections that never upgrade are closed within the upgrade timeout while a
// legitimate client still gets in.
//
// TIDEMARK_FUZZ_SEED=N replays another seed; TIDEMARK_TEST_DEBUG=1 prints the tallies.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import { ReceiverConnection } from '../shared/connection.js';
import { ENROLL_PATH, MAX_FRAME_BYTES, SESSION_PATH, decodeRequest, encodeFrame, peekRid, type PointInfo } from '../shared/protocol.js';
// The pure-JS build: the native string extractor must not see hostile bytes here either (shared/msgpack-guard.ts).
import { Packr } from 'msgpackr/pack';
import { Deployment } from './harness.js';
import { changeBlocks, makePrng, sha256File, writeMixedImage } from './fixtures.js';
import { listPoints, pointSha256, restoreSession, vaultKeys } from './point-check.js';
import { RawWs, type RawEvent } from './raw-ws.js';

const MiB = 1024 * 1024;
const SEED = Number(process.env.TIDEMARK_FUZZ_SEED ?? 20261121);
const SEMANTIC_CASES = 6000;
const FRAME_CASES = 3000;
const UPGRADE_CASES = 1200;
const RSS_LIMIT_BYTES = 300 * MiB;
/** receiver/admission.ts UPGRADE_TIMEOUT_MS */
const UPGRADE_TIMEOUT_MS = 10_000;
const debug = (...args: unknown[]) => process.env.TIDEMARK_TEST_DEBUG && console.log(...args);

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' });
const decode = (data: Buffer): any => packr.unpack(data);

function rssBytes(pid: number): number {
  const kb = /VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  assert.ok(kb, `receiver process ${pid} is gone`);
  return Number(kb) * 1024;
}

/** Samples the receiver's RSS every 100 ms; `max` is the highest seen. */
class RssWatch {
  max = 0;
  private readonly timer: NodeJS.Timeout;
  constructor(private readonly pid: number) {
    this.sample();
    this.timer = setInterval(() => this.sample(), 100);
  }
  sample(): number {
    const rss = rssBytes(this.pid);
    this.max = Math.max(this.max, rss);
    return rss;
  }
  stop(): void {
    clearInterval(this.timer);
  }
}

/** The ids a host's fuzzing refers to. */
interface HostFacts {
  host: string;
  keys: VaultKeys;
  credential: string;
  diskId: number;
  diskName: string;
  blockCount: number;
  point: PointInfo;
  sha: string;
  chunkIds: Buffer[];
}

async function facts(d: Deployment, host: string, keyFile: string, disk: string): Promise<HostFacts> {
  const keys = vaultKeys(keyFile);
  const conn = await restoreSession(d, keys);
  try {
    const [point] = await listPoints(conn, host);
    const map = await conn.request('point.map', { pointId: point!.id, diskId: point!.disks[0]!.diskId, fromBlock: 0, limit: 8192 });
    return {
      host, keys, credential: readFileSync(join(d.stateDir(host), 'credential'), 'utf8').trim(),
      diskId: point!.disks[0]!.diskId, diskName: disk, blockCount: Math.ceil(point!.disks[0]!.sizeBytes / point!.disks[0]!.blockBytes),
      point: point!, sha: await pointSha256(conn, keys, point!), chunkIds: map.ids,
    };
  } finally {
    conn.close();
  }
}

/** Runs `n` workers; the first failure stops the others (they check `stopped`) and is thrown once all have settled. */
async function workers(n: number, work: (w: number, stopped: () => boolean) => Promise<void>): Promise<void> {
  let failed = false;
  const results = await Promise.allSettled(Array.from({ length: n }, (_, w) => work(w, () => failed).catch((err: unknown) => {
    failed = true;
    throw err;
  })));
  const failure = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failure) throw failure.reason;
}

class Rng {
  readonly next: () => number;
  constructor(seed: number) {
    this.next = makePrng(seed);
  }
  int(n: number): number {
    return this.next() % n;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
  bytes(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) out[i] = this.next() & 0xff;
    return out;
  }
  bool(): boolean {
    return (this.next() & 1) === 1;
  }
}

/** Values no field of the protocol accepts in most places: wrong types, out of range, wrong sizes. */
function hostileValue(r: Rng): unknown {
  const choices: Array<() => unknown> = [
    () => 'x', () => '', () => 'A'.repeat(256 + r.int(2000)), () => true, () => false, () => null, () => ({}), () => ({ nested: { deeper: [1, { x: null }] } }),
    () => [], () => [1, 'two', null], () => -1, () => -(2 ** 31), () => 1.5, () => Number.NaN, () => Number.POSITIVE_INFINITY, () => Number.NEGATIVE_INFINITY,
    () => 2 ** 53, () => Number.MAX_VALUE, () => 2n ** 64n - 1n, () => -(2n ** 63n), () => 2 ** 32,
    () => Buffer.alloc(0), () => r.bytes(31), () => r.bytes(33), () => r.bytes(1 + r.int(4096)),
    () => Array.from({ length: 4097 + r.int(5000) }, () => r.bytes(32)), () => new Array(8193 + r.int(3000)).fill(0),
    () => Array.from({ length: 257 + r.int(300) }, (_, i) => ({ diskId: i, changedBytes: 0 })), () => new Array(100).fill(null),
  ];
  return r.pick(choices)();
}

describe('hostile input', () => {
  let d: Deployment;
  let fuzz: HostFacts;
  let victim: HostFacts;
  let victimOpenPoint: number;
  let fuzzDisk: string;

  before(async () => {
    d = await Deployment.start();
    await d.enroll('fuzz');
    await d.enroll('victim', join(d.root, 'victim.key')); // another vault
    fuzzDisk = join(d.root, 'fuzz.img');
    const victimDisk = join(d.root, 'victim.img');
    await writeMixedImage(fuzzDisk, 4 * MiB, 31);
    await writeMixedImage(victimDisk, 4 * MiB, 32);
    await d.syncOnce('fuzz', [fuzzDisk]);
    await d.syncOnce('victim', [victimDisk]);
    fuzz = await facts(d, 'fuzz', d.keyFile, fuzzDisk);
    victim = await facts(d, 'victim', join(d.root, 'victim.key'), victimDisk);
    // The victim also has an open point: other hosts must not be able to touch it.
    const conn = await ReceiverConnection.open({ url: d.receiver.url, fingerprint: d.receiver.fingerprint, path: SESSION_PATH, authorization: `Bearer ${victim.credential}` });
    await conn.request('hello', { vaultId: victim.keys.vaultId, vaultProof: victim.keys.vaultProof });
    victimOpenPoint = (await conn.request('point.begin', { resume: null })).pointId;
    conn.close();
  });
  after(() => d?.close());

  const authHeaders = (credential: string) => [`authorization: Bearer ${credential}`, 'tidemark-protocol: 1'];
  /** The last cases sent (all workers), to name the culprit if the receiver dies. */
  const recent: string[] = [];
  const sent = (name: string) => {
    recent.push(name);
    if (recent.length > 12) recent.shift();
  };
  const receiverAlive = () => {
    try {
      process.kill(d.receiver.pid, 0);
      return true;
    } catch {
      return false;
    }
  };

  async function session(): Promise<RawWs> {
    const r = await RawWs.upgrade(d.receiver.url, d.receiver.fingerprint, { path: SESSION_PATH, headers: authHeaders(fuzz.credential) }).catch((err: Error) => ({ status: null, body: err.message, ws: undefined }));
    assert.equal(r.status, 101, `authenticated upgrade: ${r.status} ${r.body}${receiverAlive() ? '' : `; THE RECEIVER DIED after: ${recent.join(' | ')}`}`);
    return r.ws!;
  }

  /** Sends requests and collects one reply per rid; fails on a close or a silence. */
  async function exchange(ws: RawWs, requests: Array<Record<string, unknown>>): Promise<Map<number, any>> {
    for (const req of requests) ws.send(encodeFrame(req));
    const replies = new Map<number, any>();
    while (replies.size < requests.length) {
      const e = await ws.next(10_000);
      if (e.kind !== 'message') assert.fail(`semantic case closed the session or went unanswered (${JSON.stringify(e)}) after ${replies.size}/${requests.length} replies to ${requests.map((q) => q.t).join(',')}`);
      const reply = decode(e.data);
      replies.set(reply.rid, reply);
    }
    return replies;
  }

  it('semantic cases on authenticated sessions: each gets its error, nothing of another host or vault leaks', async () => {
    const r = new Rng(SEED);
    const watch = new RssWatch(d.receiver.pid);
    const tally = new Map<string, number>();
    let cases = 0;
    let rid = 1;
    const now = () => Date.now();
    const randomId = () => r.bytes(32);
    const foreignIds = () => Array.from({ length: 1 + r.int(40) }, () => (r.bool() ? r.pick(victim.chunkIds) : randomId()));
    try {
      while (cases < SEMANTIC_CASES) {
        const ws = await session();
        const hello = await exchange(ws, [{ t: 'hello', rid: rid++, vaultId: fuzz.keys.vaultId, vaultProof: fuzz.keys.vaultProof }]);
        assert.equal([...hello.values()][0].t, 'ok');
        const begun = [...(await exchange(ws, [{ t: 'point.begin', rid: rid++, resume: null }])).values()][0];
        assert.equal(begun.t, 'ok');
        const ownOpen: number = begun.pointId;
        const notOwnOpen = () => r.pick([victimOpenPoint, victim.point.id, fuzz.point.id, 1 + r.int(2 ** 31), Number.MAX_SAFE_INTEGER].filter((id) => id !== ownOpen));
        type Case = { name: string; req: Record<string, unknown>; codes?: string[]; ok?: (reply: any) => void };
        const generators: Array<() => Case> = [
          () => ({ name: 'blocks.put into a point not open for this host', codes: ['E_CONFLICT'],
            req: { t: 'blocks.put', pointId: notOwnOpen(), diskId: fuzz.diskId, blocks: [0], ids: [null] } }),
          () => ({ name: 'blocks.put naming another host\'s disk', codes: ['E_FORBIDDEN'],
            req: { t: 'blocks.put', pointId: ownOpen, diskId: victim.diskId, blocks: [0], ids: [null] } }),
          () => ({ name: 'blocks.put naming a disk not registered', codes: ['E_NOT_FOUND'],
            req: { t: 'blocks.put', pointId: ownOpen, diskId: 1000 + r.int(1e6), blocks: [0], ids: [null] } }),
          () => ({ name: 'blocks.put past the end of the disk', codes: ['E_PROTOCOL'],
            req: { t: 'blocks.put', pointId: ownOpen, diskId: fuzz.diskId, blocks: [fuzz.blockCount + r.int(2 ** 40)], ids: [null] } }),
          () => { const ids = foreignIds(); return { name: 'blocks.put referencing chunks not in this vault', codes: ['E_NOT_FOUND'],
            req: { t: 'blocks.put', pointId: ownOpen, diskId: fuzz.diskId, blocks: ids.map((_, i) => i), ids } }; },
          () => ({ name: 'point.commit of a point never begun by this host', codes: ['E_CONFLICT'],
            req: { t: 'point.commit', pointId: notOwnOpen(), timeMs: now(), crashConsistent: true, disks: [{ diskId: fuzz.diskId, changedBytes: 0 }] } }),
          () => ({ name: 'point.commit from the future', codes: ['E_PROTOCOL'],
            req: { t: 'point.commit', pointId: r.pick([ownOpen, notOwnOpen()]), timeMs: now() + 86_400_000 + r.int(2 ** 40), crashConsistent: r.bool(), disks: [] } }),
          () => ({ name: 'point.map of another vault\'s or an unknown point', codes: ['E_NOT_FOUND'],
            req: { t: 'point.map', pointId: r.pick([victim.point.id, victimOpenPoint, ownOpen, 1e9 + r.int(1e6)]), diskId: r.pick([victim.diskId, fuzz.diskId]), fromBlock: 0, limit: 1 + r.int(8192) } }),
          () => ({ name: 'point.map of an own point with another host\'s disk', codes: ['E_NOT_FOUND'],
            req: { t: 'point.map', pointId: fuzz.point.id, diskId: victim.diskId, fromBlock: r.int(100), limit: 8192 } }),
          () => ({ name: 'chunk.get of another vault\'s or an unknown chunk', codes: ['E_NOT_FOUND'],
            req: { t: 'chunk.get', id: r.bool() ? r.pick(victim.chunkIds) : randomId() } }),
          () => ({ name: 'chunks.get of another vault\'s or unknown chunks', codes: ['E_NOT_FOUND'],
            req: { t: 'chunks.get', ids: foreignIds() } }),
          () => { const ids = foreignIds(); return { name: 'chunks.query of another vault\'s chunks', req: { t: 'chunks.query', ids },
            ok: (reply) => assert.deepEqual(reply.missing, ids.map((_, i) => i), 'another vault\'s chunks are missing in this vault') }; },
          () => ({ name: 'points.list of another host', codes: ['E_FORBIDDEN'], req: { t: 'points.list', host: 'victim', afterId: null } }),
          () => ({ name: 'points.list of this host', req: { t: 'points.list', host: r.pick([null, 'fuzz']), afterId: r.pick([null, 0, r.int(2 ** 40)]) },
            ok: (reply) => assert.ok(reply.points.every((p: PointInfo) => p.host === 'fuzz'), 'an agent lists only its own host') }),
          () => ({ name: 'disk.register changing the block size', codes: ['E_CONFLICT'],
            req: { t: 'disk.register', name: fuzz.diskName, sizeBytes: 4 * MiB, sectorBytes: 512, blockBytes: r.pick([4096, 8192, 1 << 20]) } }),
          () => ({ name: 'hello naming another vault or with a wrong proof', codes: ['E_FORBIDDEN'],
            req: r.bool() ? { t: 'hello', vaultId: victim.keys.vaultId, vaultProof: victim.keys.vaultProof } : { t: 'hello', vaultId: fuzz.keys.vaultId, vaultProof: randomId() } }),
          () => ({ name: 'enroll on a session', codes: ['E_FORBIDDEN'], req: { t: 'enroll', host: `h${r.int(1000)}`, vaultId: fuzz.keys.vaultId, vaultProof: fuzz.keys.vaultProof } }),
          () => { const bad = r.pick([r.bytes(1 + r.int(51)), Buffer.concat([Buffer.from('XXXX'), r.bytes(100)]), Buffer.concat([Buffer.from('TMCH'), Buffer.from([9]), r.bytes(100)]), Buffer.concat([Buffer.from('TMCH\x01'), r.bytes((1 << 20) + 53)])]);
            return { name: 'chunk.put of an envelope of illegal shape', codes: ['E_PROTOCOL'], req: { t: 'chunk.put', id: randomId(), data: bad } }; },
        ];
        // Up to 500 cases per session, pipelined 32 at a time (the receiver pauses reading at 64 in flight).
        for (let inSession = 0; inSession < 500 && cases < SEMANTIC_CASES; inSession += 32) {
          const batch = Array.from({ length: Math.min(32, SEMANTIC_CASES - cases) }, () => r.pick(generators)());
          for (const c of batch) c.req.rid = rid++;
          const replies = await exchange(ws, batch.map((c) => c.req));
          for (const c of batch) {
            const reply = replies.get(c.req.rid as number);
            if (c.codes) {
              assert.equal(reply?.t, 'error', `${c.name}: expected an error, got ${JSON.stringify(reply).slice(0, 300)}`);
              assert.ok(c.codes.includes(reply.code), `${c.name}: expected ${c.codes.join('|')}, got ${reply.code}: ${reply.message}`);
            } else {
              assert.equal(reply?.t, 'ok', `${c.name}: ${JSON.stringify(reply).slice(0, 300)}`);
              c.ok!(reply);
            }
            tally.set(c.name, (tally.get(c.name) ?? 0) + 1);
            cases++;
          }
        }
        // Last of each session: point.begin naming the victim's open point discards only this host's own.
        const rebegun = [...(await exchange(ws, [{ t: 'point.begin', rid: rid++, resume: victimOpenPoint }])).values()][0];
        assert.equal(rebegun.t, 'ok');
        assert.equal(rebegun.resumed, false);
        assert.notEqual(rebegun.pointId, victimOpenPoint);
        cases++;
        ws.destroy();
      }
    } finally {
      watch.stop();
    }
    debug('semantic cases', cases, Object.fromEntries(tally), `max RSS ${(watch.max / MiB).toFixed(0)} MiB`);
    assert.ok(watch.max < RSS_LIMIT_BYTES, `receiver RSS stayed under 300 MiB (max ${(watch.max / MiB).toFixed(0)} MiB)`);
    const catalog = new Database(join(d.receiver.dataDir, 'catalog.db'), { readonly: true });
    try {
      assert.equal(catalog.prepare('SELECT state FROM point WHERE id = ?').pluck().get(victimOpenPoint), 'open', 'the victim\'s open point is untouched');
    } finally {
      catalog.close();
    }
  });

  it('frame cases: every malformed, mutated, truncated, oversized or out-of-protocol frame gets an error and a close', async () => {
    const watch = new RssWatch(d.receiver.pid);
    const tally = new Map<string, number>();
    let cases = 0;
    let rid = 1;
    const validRequest = (r: Rng): Record<string, unknown> => {
      const id = () => r.bytes(32);
      return r.pick<() => Record<string, unknown>>([
        () => ({ t: 'hello', vaultId: fuzz.keys.vaultId, vaultProof: fuzz.keys.vaultProof }),
        () => ({ t: 'enroll', host: 'x', vaultId: fuzz.keys.vaultId, vaultProof: fuzz.keys.vaultProof }),
        () => ({ t: 'disk.register', name: fuzz.diskName, sizeBytes: 4 * MiB, sectorBytes: 512, blockBytes: 65536 }),
        () => ({ t: 'point.begin', resume: null }),
        () => ({ t: 'chunks.query', ids: [id(), id()] }),
        () => ({ t: 'chunk.put', id: id(), data: Buffer.concat([Buffer.from('TMCH\x01\x00\x00\x00'), r.bytes(100)]) }),
        () => ({ t: 'blocks.put', pointId: 1, diskId: fuzz.diskId, blocks: [0, 1], ids: [null, id()] }),
        () => ({ t: 'point.commit', pointId: 1, timeMs: Date.now(), crashConsistent: true, disks: [{ diskId: fuzz.diskId, changedBytes: 0 }] }),
        () => ({ t: 'points.list', host: null, afterId: null }),
        () => ({ t: 'point.map', pointId: fuzz.point.id, diskId: fuzz.diskId, fromBlock: 0, limit: 10 }),
        () => ({ t: 'chunk.get', id: id() }),
        () => ({ t: 'chunks.get', ids: [id(), id()] }),
      ])();
    };
    type Frame = { name: string; send: (ws: RawWs) => void; expect: 'fatal' | 'reply' | 'close' | 'text' | 'oversized'; rid?: number };
    const msgpackFrame = (name: string, bytes: Buffer): Frame => {
      let valid = false;
      try {
        decodeRequest(bytes);
        valid = true;
      } catch {
        /* the receiver must refuse it as we do */
      }
      return { name, send: (ws) => ws.send(bytes), expect: valid ? 'reply' : 'fatal', rid: peekRid(bytes) ?? undefined };
    };
    const frameGenerators = (r: Rng): Array<() => Frame> => [
      () => msgpackFrame('random bytes', r.bytes(r.int(3000))),
      () => {
        const bytes = encodeFrame({ ...validRequest(r), rid: rid++ });
        return msgpackFrame('truncated valid frame', bytes.subarray(0, r.int(bytes.length)));
      },
      () => {
        const req: Record<string, unknown> = { ...validRequest(r), rid: rid++ };
        const keys = Object.keys(req);
        const mutations = 1 + r.int(2);
        for (let i = 0; i < mutations; i++) {
          const key = r.pick(keys);
          if (r.int(6) === 0) delete req[key];
          else req[key] = hostileValue(r);
        }
        return msgpackFrame('valid request with mutated fields', encodeFrame(req));
      },
      () => msgpackFrame('unknown or missing type', encodeFrame({ t: r.pick(['point.delete', 'admin', '', 'HELLO', 7, null, ['hello']]), rid: rid++ })),
      () => msgpackFrame('not a map', encodeFrame(r.pick<unknown>([[1, 2, 3], 42, 'hello', null, true, Buffer.from('x'), 1.5]) as object)),
      () => msgpackFrame('huge declared msgpack length', Buffer.concat([Buffer.from([r.pick([0xdd, 0xdf, 0xc6, 0xdb])]), Buffer.from([0xff, 0xff, 0xff, 0xff - r.int(16)]), r.bytes(r.int(64))])),
      () => msgpackFrame('deeply nested msgpack', Buffer.concat([Buffer.alloc(1000 + r.int(900_000), 0x91), Buffer.from([0xc0])])),
      () => msgpackFrame('msgpack extension types', Buffer.from([r.pick([0xd4, 0xd5, 0xd6, 0xd7, 0xd8]), r.int(256), ...r.bytes(16)])),
      () => ({ name: 'text frame', send: (ws) => ws.send(Buffer.from(JSON.stringify({ t: 'hello', rid: 1 })), { opcode: 1 }), expect: 'text' }),
      () => ({ name: 'reserved bits set', send: (ws) => ws.send(encodeFrame({ t: 'points.list', rid: 1, host: null, afterId: null }), { rsv: 1 + r.int(7) }), expect: 'close' }),
      () => ({ name: 'reserved opcode', send: (ws) => ws.send(r.bytes(r.int(100)), { opcode: r.pick([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]) }), expect: 'close' }),
      () => ({ name: 'unmasked client frame', send: (ws) => ws.send(encodeFrame({ t: 'points.list', rid: 1, host: null, afterId: null }), { mask: false }), expect: 'close' }),
      () => ({ name: 'control frame over 125 bytes', send: (ws) => ws.send(r.bytes(126 + r.int(1000)), { opcode: 9 }), expect: 'close' }),
      () => ({ name: 'fragmented control frame', send: (ws) => ws.send(r.bytes(10), { opcode: 9, fin: false }), expect: 'close' }),
      () => ({ name: 'continuation without a start', send: (ws) => ws.send(r.bytes(100), { opcode: 0 }), expect: 'close' }),
      () => ({ name: 'close frame with an illegal code', send: (ws) => ws.send(Buffer.from([0x03, r.pick([0xe7, 0xed, 0xee])]), { opcode: 8 }), expect: 'close' }),
      () => ({ name: 'frame header claiming a huge length', send: (ws) => ws.send(Buffer.alloc(0), { length: r.pick([BigInt(MAX_FRAME_BYTES) + 1n, 2n ** 40n, 2n ** 62n]) }), expect: 'oversized' }),
      () => ({ name: 'frame one byte over the limit', send: (ws) => ws.send(Buffer.alloc(MAX_FRAME_BYTES + 1)), expect: 'oversized' }),
      () => ({ name: 'fragments adding up over the limit', send: (ws) => {
        ws.send(Buffer.alloc(700_000), { fin: false });
        ws.send(Buffer.alloc(700_000), { opcode: 0, fin: false });
      }, expect: 'oversized' }),
    ];

    const runCase = async (ws: RawWs, frame: Frame): Promise<RawWs | null> => {
      sent(frame.name);
      frame.send(ws);
      const events: RawEvent[] = [];
      const describeEvents = () => events.map((e) => (e.kind === 'message' ? `message ${JSON.stringify(decode(e.data)).slice(0, 200)}` : JSON.stringify(e))).join('; ');
      const nextEvent = async () => {
        const e = await ws.next(10_000);
        events.push(e);
        assert.notEqual(e.kind, 'timeout', `${frame.name}: no error and no close within 10 s (${describeEvents()})`);
        return e;
      };
      if (frame.expect === 'reply') {
        const e = await nextEvent();
        assert.equal(e.kind, 'message', `${frame.name}: a valid request gets a reply (${describeEvents()})`);
        const reply = decode((e as { data: Buffer }).data);
        assert.equal(reply.rid, frame.rid, `${frame.name}: reply to its rid`);
        assert.ok(reply.t === 'ok' || reply.t === 'error', `${frame.name}: ${describeEvents()}`);
        return ws; // still open: the next case uses it
      }
      let first = await nextEvent();
      if (frame.expect === 'fatal' || frame.expect === 'text') {
        assert.equal(first.kind, 'message', `${frame.name}: an error frame before the close (${describeEvents()})`);
        const error = decode((first as { data: Buffer }).data);
        assert.equal(error.t, 'error');
        assert.equal(error.code, 'E_PROTOCOL', `${frame.name}: ${describeEvents()}`);
        if (frame.rid !== undefined) assert.equal(error.rid, frame.rid, `${frame.name}: the error names the frame's rid`);
        first = await nextEvent();
      }
      const expectedCode = { fatal: [1002], text: [1003], oversized: [1009], close: [1002, 1007, 1009] }[frame.expect];
      if (first.kind === 'close') assert.ok(expectedCode.includes(first.code ?? 0), `${frame.name}: close ${first.code}, expected ${expectedCode} (${describeEvents()})`);
      else assert.equal(first.kind, 'end', `${frame.name}: ${describeEvents()}`);
      ws.destroy();
      return null;
    };

    try {
      // Each worker draws from its own seeded generator, so a seed replays the same cases.
      const count = 6;
      await workers(count, async (w, stopped) => {
        const r = new Rng(SEED + 100 + w);
        const generators = frameGenerators(r);
        let ws: RawWs | null = null;
        for (let i = 0; i < Math.ceil(FRAME_CASES / count) && !stopped(); i++) {
          const frame = r.pick(generators)();
          ws ??= await session();
          ws = await runCase(ws, frame);
          tally.set(frame.name, (tally.get(frame.name) ?? 0) + 1);
          cases++;
        }
        ws?.destroy();
      });
    } finally {
      watch.stop();
    }
    debug('frame cases', cases, Object.fromEntries(tally), `max RSS ${(watch.max / MiB).toFixed(0)} MiB`);
    assert.ok(cases >= FRAME_CASES);
    assert.ok(watch.max < RSS_LIMIT_BYTES, `receiver RSS stayed under 300 MiB (max ${(watch.max / MiB).toFixed(0)} MiB)`);
  });

  it('upgrade cases without a valid session: each gets an HTTP refusal or a close', async () => {
    const watch = new RssWatch(d.receiver.pid);
    const tally = new Map<string, number>();
    let cases = 0;
    const version = 'tidemark-protocol: 1';
    /** `mustClose`: the receiver must close the connection after its refusal (all but kept-alive plain HTTP 404s). */
    type Upgrade = { name: string; path: string; headers: string[]; bare?: boolean; raw?: Buffer; statuses: number[]; mustClose: boolean };
    const upgradeGenerators = (r: Rng): Array<() => Upgrade> => [
      () => ({ name: 'wrong protocol version', path: r.pick([SESSION_PATH, ENROLL_PATH]), statuses: [426], mustClose: true,
        headers: [`authorization: Bearer ${fuzz.credential}`, ...(r.int(4) === 0 ? [] : [`tidemark-protocol: ${r.pick(['0', '2', '11', '1.0', 'v1', '', 'x'.repeat(1 + r.int(4000))])}`])] }),
      () => ({ name: 'unknown path', headers: [version, `authorization: Bearer ${fuzz.credential}`], statuses: [400, 404], mustClose: true,
        path: r.pick(['/', '/v2/session', '/v1/session/x', '/v1/sessions', '/v1/session/..', '/v1/enroll/../session/x', '/%00', '//', '//@', '///', '//[', 'http://[', '*', `/${r.bytes(20).toString('hex')}`]) }),
      () => ({ name: 'bad credential', path: SESSION_PATH, statuses: [401], mustClose: true, headers: [version, ...r.pick([
        [], ['authorization: Bearer'], ['authorization: Bearer a b'], [`authorization: Bearer tmhost_${r.bytes(24).toString('base64url')}`],
        [`authorization: Token ${fuzz.credential}`], [`authorization: Bearer ${'a'.repeat(201 + r.int(3000))}`], ['authorization: Basic dXNlcjpwYXNz'],
        [`authorization: bearer ${fuzz.credential}`], [`authorization: Bearer ${fuzz.credential}x`], [`authorization: Bearer ${r.bytes(40).toString('base64')}`],
      ])] }),
      () => ({ name: 'bad enrollment token', path: ENROLL_PATH, statuses: [401], mustClose: true,
        headers: [version, r.pick([`authorization: Bearer ${fuzz.credential}`, `authorization: Token tmenroll_${r.bytes(24).toString('base64url')}`, 'authorization: Token'])] }),
      () => ({ name: 'broken WebSocket handshake', path: SESSION_PATH, bare: true, statuses: [400, 404, 426], mustClose: false,
        headers: [version, `authorization: Bearer ${fuzz.credential}`, ...r.pick([
          ['Upgrade: websocket', 'Connection: Upgrade', 'Sec-WebSocket-Version: 13'],
          ['Upgrade: websocket', 'Connection: Upgrade', 'Sec-WebSocket-Key: x', 'Sec-WebSocket-Version: 13'],
          ['Upgrade: websocket', 'Connection: Upgrade', `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}`, `Sec-WebSocket-Version: ${r.pick(['7', '12', '14', 'x'])}`], // ws speaks 8 and 13
          ['Upgrade: h2c', 'Connection: Upgrade'],
          [],
        ])] }),
      // Garbage the parser refuses gets 400 and a close; garbage that happens to parse as a plain GET gets 404.
      () => ({ name: 'garbage HTTP', path: '', headers: [], statuses: [400, 404], mustClose: false,
        raw: r.bool() ? r.bytes(1 + r.int(2000)) : Buffer.from(`${r.pick(['GET', 'POST', 'BREW', 'G\0T'])} ${r.pick(['/', '', ' '])} HTTP/${r.pick(['1.1', '9.9', 'x'])}\r\n${r.bytes(r.int(200)).toString('latin1')}\r\n\r\n`, 'latin1') }),
    ];
    const plainTcpGarbage = async (r: Rng) => {
      const socket = netConnect(d.receiver.port, '127.0.0.1');
      socket.on('error', () => {});
      await new Promise((res) => socket.once('connect', res));
      socket.write(r.bytes(1 + r.int(3000)));
      socket.resume(); // read (and drop) what comes back: a paused socket never sees the FIN after a TLS alert
      const closed = await new Promise<boolean>((res) => {
        // Most garbage is refused at once; bytes that look like the start of a TLS record wait for the rest until the upgrade timeout.
        const timer = setTimeout(() => res(false), UPGRADE_TIMEOUT_MS + 2000);
        socket.once('close', () => (clearTimeout(timer), res(true)));
      });
      socket.destroy();
      assert.ok(closed, 'plain TCP garbage on the TLS port is closed');
    };
    try {
      const count = 6;
      await workers(count, async (w, stopped) => {
        const r = new Rng(SEED + 200 + w);
        const generators = upgradeGenerators(r);
        for (let i = 0; i < Math.ceil(UPGRADE_CASES / count) && !stopped(); i++) {
          if (r.int(12) === 0) {
            await plainTcpGarbage(r);
            tally.set('plain TCP garbage', (tally.get('plain TCP garbage') ?? 0) + 1);
            cases++;
            continue;
          }
          const c = r.pick(generators)();
          sent(`${c.name} ${JSON.stringify(c.path)}`);
          const res = await RawWs.upgrade(d.receiver.url, d.receiver.fingerprint, { path: c.path, headers: c.headers, bare: c.bare, raw: c.raw }, { closeWaitMs: 3000 })
            .catch((err: Error) => assert.fail(`${c.name} ${JSON.stringify(c.path)}: cannot connect: ${err.message}${receiverAlive() ? '' : `; THE RECEIVER DIED after: ${recent.join(' | ')}`}`));
          const what = `${c.name} (${JSON.stringify(c.path).slice(0, 60)}): ${res.status} ${res.body.slice(0, 200)} closed=${res.closed}` +
            (receiverAlive() ? '' : `; THE RECEIVER DIED after: ${recent.join(' | ')}`);
          assert.notEqual(res.status, 101, `${what}: must not upgrade`);
          // An HTTP refusal, or (garbage the HTTP parser gives up on) a close without one.
          if (res.status === null) assert.ok(res.closed, what);
          else assert.ok(c.statuses.includes(res.status), what);
          if (c.mustClose || res.status === 400) assert.ok(res.closed, `${what}: the refused connection is closed`);
          tally.set(c.name, (tally.get(c.name) ?? 0) + 1);
          cases++;
        }
      });
    } finally {
      watch.stop();
    }
    debug('upgrade cases', cases, Object.fromEntries(tally), `max RSS ${(watch.max / MiB).toFixed(0)} MiB`);
    assert.ok(watch.max < RSS_LIMIT_BYTES, `receiver RSS stayed under 300 MiB (max ${(watch.max / MiB).toFixed(0)} MiB)`);
  });

  it('a frame header claiming a huge length is refused before allocation (1009), RSS does not jump', async () => {
    const before = rssBytes(d.receiver.pid);
    const results = await Promise.all(Array.from({ length: 40 }, async (_, i) => {
      const ws = await session();
      ws.send(Buffer.alloc(0), { length: i % 2 === 0 ? 2n ** 40n : BigInt(Number.MAX_SAFE_INTEGER) });
      const started = Date.now();
      let e = await ws.next(5000);
      while (e.kind === 'message') e = await ws.next(5000);
      ws.destroy();
      return { e, ms: Date.now() - started };
    }));
    const after = rssBytes(d.receiver.pid);
    for (const { e, ms } of results) {
      assert.equal(e.kind, 'close', JSON.stringify(e));
      assert.equal((e as { code: number }).code, 1009);
      assert.ok(ms < 2000, `refused at once (${ms} ms)`);
    }
    assert.ok(after - before < 32 * MiB, `RSS did not jump (${(before / MiB).toFixed(0)} → ${(after / MiB).toFixed(0)} MiB)`);
  });

  it('300 idle connections that never upgrade are closed within the timeout; a legitimate client still gets in', async () => {
    const before = rssBytes(d.receiver.pid);
    const openedMs = Date.now();
    const closedAfter: number[] = [];
    const sockets: Socket[] = [];
    const track = (socket: Socket) => {
      socket.on('error', () => {});
      socket.once('close', () => closedAfter.push(Date.now() - openedMs));
      sockets.push(socket);
    };
    // Half stay silent after TCP connect (no TLS hello), half complete TLS and send no request.
    for (let i = 0; i < 150; i++) track(netConnect(d.receiver.port, '127.0.0.1'));
    for (let i = 0; i < 150; i++) track(tlsConnect({ host: '127.0.0.1', port: d.receiver.port, rejectUnauthorized: false }));
    // Over the per-address cap, newcomers are refused while the oldest are younger than 1 s
    // (EVICT_AFTER_MS: still handshaking); after that a newcomer closes the oldest idle one.
    await new Promise((res) => setTimeout(res, 1500));
    // While they are open, a real client connects, authenticates and reads.
    const legitStarted = Date.now();
    const conn = await restoreSession(d, fuzz.keys);
    const points = await listPoints(conn, 'fuzz');
    conn.close();
    assert.ok(points.some((p) => p.id === fuzz.point.id), 'the legitimate client read the points');
    assert.ok(Date.now() - legitStarted < 5000, 'and was not held up');
    const openWhileLegit = 300 - closedAfter.length;
    // Every idle connection is closed by the receiver within the upgrade timeout (plus slack).
    const deadline = openedMs + UPGRADE_TIMEOUT_MS + 3000;
    while (closedAfter.length < 300 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 100));
    for (const s of sockets) s.destroy();
    debug('idle connections', { openWhileLegit, closedWithin1s: closedAfter.filter((t) => t < 1000).length, lastClosedMs: Math.max(...closedAfter) });
    assert.equal(closedAfter.length, 300, `all idle connections closed by the receiver within ${UPGRADE_TIMEOUT_MS + 3000} ms (${closedAfter.length} were)`);
    assert.ok(openWhileLegit > 0, 'the legitimate client connected while idle connections were still open');
    assert.ok(closedAfter.filter((t) => t < 2000).length >= 200, 'over the per-address cap (64), connections are closed at once');
    assert.ok(Math.max(...closedAfter) >= UPGRADE_TIMEOUT_MS - 1500, 'those within the cap are closed by the timeout');
    const after = rssBytes(d.receiver.pid);
    assert.ok(after - before < 64 * MiB, `RSS bounded (${(before / MiB).toFixed(0)} → ${(after / MiB).toFixed(0)} MiB)`);
  });

  it('after all that: the receiver is up, committed data is intact, a normal sync and restore work', async () => {
    assert.doesNotThrow(() => process.kill(d.receiver.pid, 0), 'the receiver process is still running');
    const conn = await restoreSession(d, fuzz.keys);
    try {
      const [first] = await listPoints(conn, 'fuzz');
      assert.equal(first!.id, fuzz.point.id);
      assert.equal(await pointSha256(conn, fuzz.keys, first!), fuzz.sha, 'the fuzzing host\'s committed point is intact');
    } finally {
      conn.close();
    }
    const victimConn = await restoreSession(d, victim.keys);
    try {
      const points = await listPoints(victimConn, 'victim');
      assert.deepEqual(points.map((p) => p.id), [victim.point.id], 'no point was added to or removed from the victim');
      assert.equal(await pointSha256(victimConn, victim.keys, points[0]!), victim.sha, 'the victim\'s committed point is intact');
    } finally {
      victimConn.close();
    }
    await changeBlocks(fuzzDisk, 64 * 1024, 16, 33);
    const result = await d.syncOnce('fuzz', [fuzzDisk]);
    const out = join(d.root, 'after-fuzz.img');
    await d.restore('fuzz', fuzzDisk, result.pointId, out);
    assert.equal(await sha256File(out), await sha256File(fuzzDisk), 'a sync after the fuzzing restores identical');
  });
});

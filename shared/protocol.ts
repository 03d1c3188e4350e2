// The wire protocol (docs/SPEC.md §3): WebSocket over TLS, one msgpack map per
// binary frame. Every request carries a request id `rid`; the reply echoes it
// as `{t: 'ok', rid, ...}` or `{t: 'error', rid, code, message, retryable}`.
// Both sides validate every frame against the schemas below; anything else is
// a protocol error.
// `msgpackr/pack` is msgpackr's pure-JavaScript build: its native string extractor
// (msgpackr-extract) trusts declared lengths and must never see network bytes.
import { Packr } from 'msgpackr/pack';
import { z } from 'zod';
import { CHUNK_ID_BYTES, CHUNK_OVERHEAD_BYTES } from './chunk-crypto.js';
import { TidemarkError, isErrorCode, type ErrorCode } from './errors.js';
import { checkMsgpackFrame } from './msgpack-guard.js';

export const PROTOCOL_VERSION = 1;
export const PROTOCOL_HEADER = 'tidemark-protocol';
export const ENROLL_PATH = `/v${PROTOCOL_VERSION}/enroll`;
export const SESSION_PATH = `/v${PROTOCOL_VERSION}/session`;

export const MIN_BLOCK_BYTES = 4096;
export const MAX_BLOCK_BYTES = 1 << 20;
export const DEFAULT_BLOCK_BYTES = 64 * 1024;
export const MAX_IDS_PER_QUERY = 4096;
export const MAX_BLOCKS_PER_PUT = 8192;
export const MAX_MAP_PAGE = 8192;
export const MAX_POINTS_PAGE = 1000;
export const MAX_IDS_PER_GET = 64;
/** What a receiver lists in its hello reply: the messages added to protocol v1 since release (SPEC §2). */
export const RECEIVER_FEATURES = ['chunks.get'] as const;
export type ReceiverFeature = (typeof RECEIVER_FEATURES)[number];

/** A chunks.get reply carries at most this many envelope bytes (and at least one envelope), so it always fits a frame. */
export const MAX_GET_REPLY_BYTES = MAX_BLOCK_BYTES + CHUNK_OVERHEAD_BYTES;
export const MAX_REASON_CHARS = 1000;
/** WebSocket close code of a session whose credential or token was revoked or expired (SPEC §3.7). */
export const CLOSE_REVOKED = 4401;
/** The states of a protected host (DESIGN §1), as the agent reports them. */
export const HOST_STATES = ['Initialized', 'Scanning', 'InitialSync', 'Replicating', 'Resyncing', 'Error'] as const;
export type HostState = (typeof HOST_STATES)[number];
/** Largest legal frame: a chunk.put of a maximal block (or a full chunks.get reply), plus msgpack framing. */
export const MAX_FRAME_BYTES = MAX_BLOCK_BYTES + CHUNK_OVERHEAD_BYTES + 1024;

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' });

const rid = z.number().int().min(0).max(0xffffffff);
const bin = z.custom<Uint8Array>((v) => v instanceof Uint8Array, 'expected binary data').transform((u) => (Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength)));
const id32 = bin.refine((b) => b.length === CHUNK_ID_BYTES, 'chunk id must be 32 bytes');
const uint = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const name = z.string().min(1).max(255);
const vaultId = z.string().regex(/^[0-9a-f]{32}$/);
/** VaultKeys.vaultProof: shows the sender holds the vault's key (SPEC §6.2). */
const vaultProof = bin.refine((b) => b.length === 32, 'vault proof must be 32 bytes');
const blockBytes = z.number().int().min(MIN_BLOCK_BYTES).max(MAX_BLOCK_BYTES).refine((n) => (n & (n - 1)) === 0, 'block size must be a power of two');
/** Strictly increasing: a page of the block map names each block once, in order. */
const increasing = (values: number[]) => values.every((v, i) => i === 0 || v > values[i - 1]!);

export const requestSchemas = {
  enroll: z.object({ t: z.literal('enroll'), rid, host: name, vaultId, vaultProof }),
  hello: z.object({ t: z.literal('hello'), rid, vaultId, vaultProof }),
  'disk.register': z.object({
    t: z.literal('disk.register'), rid, name,
    sizeBytes: uint,
    sectorBytes: z.number().int().min(512).max(65536),
    blockBytes,
  }),
  'point.begin': z.object({ t: z.literal('point.begin'), rid, resume: uint.nullable() }),
  'chunks.query': z.object({ t: z.literal('chunks.query'), rid, ids: z.array(id32).max(MAX_IDS_PER_QUERY) }),
  'chunk.put': z.object({ t: z.literal('chunk.put'), rid, id: id32, data: bin }),
  'blocks.put': z.object({
    t: z.literal('blocks.put'), rid, pointId: uint, diskId: uint,
    blocks: z.array(uint).max(MAX_BLOCKS_PER_PUT),
    /** null: the block is all zeros (or discarded). */
    ids: z.array(id32.nullable()).max(MAX_BLOCKS_PER_PUT),
  }).refine((m) => m.blocks.length === m.ids.length, 'blocks and ids differ in length'),
  'point.commit': z.object({
    t: z.literal('point.commit'), rid, pointId: uint, timeMs: uint, crashConsistent: z.boolean(),
    disks: z.array(z.object({ diskId: uint, changedBytes: uint })).max(256),
  }),
  'points.list': z.object({ t: z.literal('points.list'), rid, host: name.nullable(), afterId: uint.nullable() }),
  'point.map': z.object({ t: z.literal('point.map'), rid, pointId: uint, diskId: uint, fromBlock: uint, limit: z.number().int().min(1).max(MAX_MAP_PAGE) }),
  'chunk.get': z.object({ t: z.literal('chunk.get'), rid, id: id32 }),
  'chunks.get': z.object({ t: z.literal('chunks.get'), rid, ids: z.array(id32).min(1).max(MAX_IDS_PER_GET) }),
  'status.report': z.object({
    t: z.literal('status.report'), rid, state: z.enum(HOST_STATES), reason: z.string().max(MAX_REASON_CHARS).nullable(),
    tracker: z.enum(['tracefs', 'scan']).nullable(), backlogBytes: uint, bytesPerSecond: uint,
  }),
} as const;

export type RequestType = keyof typeof requestSchemas;
export type Request<T extends RequestType = RequestType> = z.infer<(typeof requestSchemas)[T]>;
/** A request as the client builds it: `rid` is filled in by the connection. */
export type RequestBody<T extends RequestType> = Omit<z.input<(typeof requestSchemas)[T]>, 'rid' | 't'>;

/** A receiver's word is checked as an agent's is: restore loops over `sizeBytes / blockBytes` blocks. */
export const pointDiskSchema = z.object({ diskId: uint, name, sizeBytes: uint, blockBytes, changedBytes: uint });
export const pointSchema = z.object({
  id: uint, host: name, timeMs: uint, committedMs: uint, crashConsistent: z.boolean(), disks: z.array(pointDiskSchema),
});
export type PointInfo = z.infer<typeof pointSchema>;

export const replySchemas = {
  enroll: z.object({ hostId: uint, credential: z.string() }),
  hello: z.object({
    role: z.enum(['agent', 'restore']),
    host: name.nullable(),
    /** Messages added to protocol v1 since release that this receiver handles (SPEC §2); absent from older receivers. */
    features: z.array(z.string().max(64)).max(64).optional(),
  }),
  'disk.register': z.object({
    diskId: uint,
    hasHistory: z.boolean(),
    /** The newest committed point that covers the disk (null: none); absent from older receivers. */
    lastPointId: uint.nullable().optional(),
  }),
  'point.begin': z.object({
    pointId: uint,
    /** The open point named by `resume` was continued. */
    resumed: z.boolean(),
    /** The point named by `resume` had already been committed (the agent missed the reply). */
    resumeCommitted: z.boolean(),
  }),
  'chunks.query': z.object({ missing: z.array(uint) }),
  'chunk.put': z.object({ stored: z.boolean() }),
  'blocks.put': z.object({ staged: uint }),
  'point.commit': z.object({ pointId: uint }),
  'points.list': z.object({
    points: z.array(pointSchema).max(MAX_POINTS_PAGE),
    next: uint.nullable(),
    /** With a `host`: whether the session's vault has a host of that name (none yet: no points); absent from older receivers. */
    hostExists: z.boolean().optional(),
  })
    .refine((m) => increasing(m.points.map((p) => p.id)), 'points not in increasing id order')
    .refine((m) => m.next === null || (m.points.length > 0 && m.next >= m.points.at(-1)!.id), 'next does not follow the page'),
  // Restore writes, failback compares and export streams blocks in this order: a map out of order or
  // naming a block twice would put data at the wrong place. Pages relative to fromBlock: restore/point-blocks.ts.
  'point.map': z.object({ blocks: z.array(uint).max(MAX_MAP_PAGE), ids: z.array(id32).max(MAX_MAP_PAGE), next: uint.nullable() })
    .refine((m) => m.blocks.length === m.ids.length, 'blocks and ids differ in length')
    .refine((m) => increasing(m.blocks), 'blocks not in increasing order')
    .refine((m) => m.next === null || m.blocks.length === 0 || m.next > m.blocks.at(-1)!, 'next does not follow the page'),
  'chunk.get': z.object({ data: bin }),
  /** Envelopes of a prefix of the ids asked for, in their order (SPEC §3.4). */
  'chunks.get': z.object({ data: z.array(bin).min(1).max(MAX_IDS_PER_GET) }),
  'status.report': z.object({}),
} satisfies Record<RequestType, z.ZodType>;

export type Reply<T extends RequestType> = z.infer<(typeof replySchemas)[T]>;

const errorSchema = z.object({ t: z.literal('error'), rid: rid.nullable(), code: z.string(), message: z.string().max(4096), retryable: z.boolean() });

export function encodeFrame(message: object): Buffer {
  return packr.pack(message);
}

function decodeMap(frame: Buffer): Record<string, unknown> {
  // Every declared length and count checked against the frame before a decoder trusts it.
  checkMsgpackFrame(frame);
  let value: unknown;
  try {
    value = packr.unpack(frame);
  } catch {
    throw new TidemarkError('E_PROTOCOL', 'frame is not valid msgpack');
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new TidemarkError('E_PROTOCOL', 'frame is not a msgpack map');
  return value as Record<string, unknown>;
}

/** Server side: decode and validate a request; throws E_PROTOCOL naming the problem. */
export function decodeRequest(frame: Buffer): Request {
  const value = decodeMap(frame);
  const type = value.t;
  // Own keys only: `in` would take 'constructor' or '__proto__' for a message type.
  if (typeof type !== 'string' || !Object.hasOwn(requestSchemas, type)) throw new TidemarkError('E_PROTOCOL', `unknown message type ${JSON.stringify(type)}`);
  const parsed = requestSchemas[type as RequestType].safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new TidemarkError('E_PROTOCOL', `malformed ${type}: ${issue?.path.join('.') || 'frame'}: ${issue?.message}`);
  }
  return parsed.data as Request;
}

/** Best-effort request id of an invalid frame, so the error can be matched to its request. */
export function peekRid(frame: Buffer): number | null {
  try {
    const r = decodeMap(frame).rid;
    return typeof r === 'number' && Number.isInteger(r) && r >= 0 ? r : null;
  } catch {
    return null;
  }
}

export type ReplyFrame = { t: 'ok'; rid: number; body: Record<string, unknown> } | { t: 'error'; rid: number | null; error: TidemarkError };

/** Client side: decode a reply frame (body validated later against the request's reply schema). */
export function decodeReply(frame: Buffer): ReplyFrame {
  const value = decodeMap(frame);
  if (value.t === 'ok' && typeof value.rid === 'number') return { t: 'ok', rid: value.rid, body: value };
  const parsed = errorSchema.safeParse(value);
  if (!parsed.success) throw new TidemarkError('E_PROTOCOL', 'receiver sent a frame that is neither a reply nor an error');
  const code: ErrorCode = isErrorCode(parsed.data.code) ? parsed.data.code : 'E_PROTOCOL';
  return { t: 'error', rid: parsed.data.rid, error: new TidemarkError(code, parsed.data.message, { retryable: parsed.data.retryable }) };
}

export function parseReply<T extends RequestType>(type: T, body: Record<string, unknown>): Reply<T> {
  const parsed = replySchemas[type].safeParse(body);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new TidemarkError('E_PROTOCOL', `receiver sent a malformed reply to ${type} (${issue?.path.join('.') || 'reply'}: ${issue?.message}); the receiver is faulty or not a Tidemark receiver: tell its operator`);
  }
  return parsed.data as Reply<T>;
}

export function errorFrame(ridValue: number | null, err: TidemarkError): Buffer {
  return encodeFrame({ t: 'error', rid: ridValue, code: err.code, message: err.message, retryable: err.retryable });
}

export function okFrame(ridValue: number, body: object): Buffer {
  return encodeFrame({ ...body, t: 'ok', rid: ridValue });
}

const BIN32_HEAD_BYTES = 5;

/** {t: 'chunk.put', rid: uint32, id: bin8, data: bin32}: the head of a chunk.put, rid and lengths filled in per frame. */
const CHUNK_PUT_HEAD = Buffer.from('84' + 'a174' + 'a9' + Buffer.from('chunk.put').toString('hex') + 'a3726964' + 'ce00000000' + 'a26964' + 'c400', 'hex');
const CHUNK_PUT_RID_AT = 18;
const CHUNK_PUT_ID_LENGTH_AT = 26;
const CHUNK_PUT_DATA_KEY = Buffer.from('a464617461', 'hex');

/**
 * encodeFrame of a chunk.put request, written directly into memory the caller
 * provides (`allocate`): the agent sends one per stored chunk, and reuses that
 * memory (shared/frame-ring.ts) rather than leave a fresh buffer per chunk for
 * the garbage collector. The same msgpack map the receiver decodes from any encoder.
 */
export function chunkPutFrame(ridValue: number, id: Uint8Array, data: Uint8Array, allocate: (bytes: number) => Buffer): Buffer {
  const dataAt = CHUNK_PUT_HEAD.length + id.length + CHUNK_PUT_DATA_KEY.length;
  const frame = allocate(dataAt + BIN32_HEAD_BYTES + data.length);
  CHUNK_PUT_HEAD.copy(frame);
  frame.writeUInt32BE(ridValue, CHUNK_PUT_RID_AT);
  frame.writeUInt8(id.length, CHUNK_PUT_ID_LENGTH_AT);
  frame.set(id, CHUNK_PUT_HEAD.length);
  CHUNK_PUT_DATA_KEY.copy(frame, dataAt - CHUNK_PUT_DATA_KEY.length);
  frame[dataAt] = 0xc6;
  frame.writeUInt32BE(data.length, dataAt + 1);
  frame.set(data, dataAt + BIN32_HEAD_BYTES);
  return frame;
}

/** {t: 'ok', rid: uint32, data: array16}: the head of a chunks.get reply, rid and count filled in per reply. */
const CHUNKS_REPLY_HEAD = Buffer.from('83' + 'a174' + 'a26f6b' + 'a3726964' + 'ce00000000' + 'a464617461' + 'dc0000', 'hex');
const CHUNKS_REPLY_RID_AT = 11;
const CHUNKS_REPLY_COUNT_AT = 21;

/**
 * okFrame(rid, {data: envelopes}) for a chunks.get reply, written directly: the
 * same msgpack map, but each envelope copied once. msgpackr copied a ~1 MiB
 * reply through buffers it grew as it went, which cost the receiver more than
 * reading the chunks (~0.6 CPU-s per GiB restored).
 */
export function chunksReplyFrame(ridValue: number, envelopes: Buffer[]): Buffer {
  const frame = Buffer.allocUnsafe(CHUNKS_REPLY_HEAD.length + envelopes.reduce((sum, e) => sum + BIN32_HEAD_BYTES + e.length, 0));
  CHUNKS_REPLY_HEAD.copy(frame);
  frame.writeUInt32BE(ridValue, CHUNKS_REPLY_RID_AT);
  frame.writeUInt16BE(envelopes.length, CHUNKS_REPLY_COUNT_AT);
  let at = CHUNKS_REPLY_HEAD.length;
  for (const envelope of envelopes) {
    frame[at] = 0xc6;
    frame.writeUInt32BE(envelope.length, at + 1);
    at += BIN32_HEAD_BYTES + envelope.copy(frame, at + BIN32_HEAD_BYTES);
  }
  return frame;
}

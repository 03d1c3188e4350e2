// Client side of the wire protocol: a TLS connection pinned to the receiver's
// certificate fingerprint, then a WebSocket carrying pipelined requests.
// The fingerprint is checked on the raw TLS socket *before* the HTTP upgrade
// (which carries the credential) is written.
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import WebSocket from 'ws';
import { TidemarkError, asTidemarkError } from './errors.js';
import { FrameRing } from './frame-ring.js';
import {
  CLOSE_REVOKED, MAX_FRAME_BYTES, PROTOCOL_HEADER, PROTOCOL_VERSION,
  chunkPutFrame, decodeReply, encodeFrame, parseReply, type ReceiverFeature, type Reply, type RequestBody, type RequestType,
} from './protocol.js';

export function normalizeFingerprint(fp: string): string {
  const hex = fp.replace(/^sha256:/i, '').replace(/[:\s]/g, '').toUpperCase();
  if (!/^[0-9A-F]{64}$/.test(hex)) throw new TidemarkError('E_USAGE', `invalid fingerprint "${fp}": expected the SHA-256 fingerprint printed by tidemark-receiver init`);
  return hex;
}

export function parseReceiverUrl(url: string): URL {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new TidemarkError('E_USAGE', `invalid receiver address "${url}": expected wss://HOST:PORT`);
  }
  if (parsed.protocol !== 'wss:') throw new TidemarkError('E_USAGE', `receiver address must start with wss:// (got ${parsed.protocol}//)`);
  return parsed;
}

function unreachable(url: URL, err: Error): TidemarkError {
  return new TidemarkError('E_UNREACHABLE', `receiver unreachable at ${url.host}: ${err.message}; check the address and that tidemark-receiver serve is running`, { cause: err });
}

export function connectPinned(url: URL, fingerprint: string, timeoutMs = 10_000): Promise<TLSSocket> {
  const expected = normalizeFingerprint(fingerprint);
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({
      host: url.hostname.replace(/^\[|\]$/g, ''),
      port: Number(url.port || 443),
      servername: /^[\d.:[\]]+$/.test(url.hostname) ? undefined : url.hostname,
      // Trust comes from the pinned fingerprint, not from a CA chain.
      rejectUnauthorized: false,
      timeout: timeoutMs,
    });
    const fail = (err: TidemarkError) => {
      socket.destroy();
      reject(err);
    };
    socket.once('timeout', () => fail(unreachable(url, new Error(`no TLS handshake within ${timeoutMs} ms`))));
    socket.once('error', (err) => fail(unreachable(url, err)));
    socket.once('secureConnect', () => {
      const actual = socket.getPeerCertificate().fingerprint256?.replace(/:/g, '') ?? '';
      if (actual !== expected) {
        return fail(new TidemarkError('E_FINGERPRINT', `receiver at ${url.host} presented certificate fingerprint ${actual || 'none'}, not the pinned one; check --fingerprint (nothing was sent)`));
      }
      socket.setTimeout(0);
      socket.removeAllListeners('error');
      socket.removeAllListeners('timeout');
      resolve(socket);
    });
  });
}

export interface ConnectionOptions {
  url: string;
  fingerprint: string;
  path: string;
  /** Value of the Authorization header: `Bearer <credential>` or `Token <enrollment token>`. */
  authorization: string;
  /** Cap on bytes sent per second (--bwlimit); 0 = unlimited. */
  bytesPerSecond?: number;
  /** Ping interval; a link on which nothing moved for two intervals is given up. */
  heartbeatMs?: number;
}

export const HEARTBEAT_MS = 15_000;

const WRITE_HIGH_WATER_BYTES = 8 * 1024 * 1024;
/** Room for every frame the high-water mark lets wait, plus the space a wrap can leave unused. */
const FRAME_RING_BYTES = WRITE_HIGH_WATER_BYTES + 2 * MAX_FRAME_BYTES;

interface Pending {
  type: RequestType;
  resolve: (body: Record<string, unknown>) => void;
  reject: (err: TidemarkError) => void;
}

export class ReceiverConnection {
  private nextRid = 1;
  private readonly pending = new Map<number, Pending>();
  private unflushedBytes = 0;
  private writeWaiters: Array<() => void> = [];
  private closedError: TidemarkError | null = null;
  private readonly limiter: RateLimiter | null;
  /** Last time the receiver sent anything or our sends drained: a half-open link shows neither. */
  private lastAliveMs = Date.now();
  private readonly heartbeat: NodeJS.Timeout;
  private receiverFeatures = new Set<string>();
  private readonly frameRing = new FrameRing(FRAME_RING_BYTES);

  private constructor(private readonly ws: WebSocket, bytesPerSecond: number, heartbeatMs: number) {
    this.limiter = bytesPerSecond > 0 ? new RateLimiter(bytesPerSecond) : null;
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      this.alive();
      this.onMessage(data, isBinary);
    });
    ws.on('pong', () => this.alive());
    ws.on('ping', () => this.alive());
    ws.on('close', (code: number, reason: Buffer) => {
      const why = `${code}${reason.length ? `: ${reason.toString()}` : ''}`;
      // Revoked is not a network problem: retrying cannot help, and scripts must tell them apart (exit 6, not 4).
      this.failAll(code === CLOSE_REVOKED
        ? new TidemarkError('E_AUTH', `the receiver closed the session (${why}); ask its operator for a new token or credential`)
        : new TidemarkError('E_UNREACHABLE', `connection to receiver closed (${why})`));
    });
    ws.on('error', (err) => this.failAll(asTidemarkError(err)));
    this.heartbeat = setInterval(() => this.checkAlive(heartbeatMs), heartbeatMs).unref();
  }

  private alive(): void {
    this.lastAliveMs = Date.now();
  }

  /** Without this, a receiver that vanished without a FIN or RST (power loss, partition) stalls every request forever. */
  private checkAlive(heartbeatMs: number): void {
    const silentMs = Date.now() - this.lastAliveMs;
    if (silentMs <= 2 * heartbeatMs) return void this.ws.ping();
    this.failAll(new TidemarkError('E_UNREACHABLE', `receiver did not answer for ${Math.round(silentMs / 1000)} s (network down or receiver hung); will reconnect`));
    this.ws.terminate();
  }

  static async open(options: ConnectionOptions): Promise<ReceiverConnection> {
    const url = parseReceiverUrl(options.url);
    const socket = await connectPinned(url, options.fingerprint);
    const ws = new WebSocket(new URL(options.path, url), {
      createConnection: () => socket,
      headers: { authorization: options.authorization, [PROTOCOL_HEADER]: String(PROTOCOL_VERSION) },
      perMessageDeflate: false,
      maxPayload: MAX_FRAME_BYTES,
      handshakeTimeout: 10_000,
      // An all-zero mask: both ends then skip the XOR over every payload byte (ws's JS fallback
      // costs a CPU-second per GiB on each side). Masking guards browsers' shared proxies against
      // cache poisoning; this client is not a browser and the link is TLS end to end.
      generateMask: (mask: Buffer) => void mask.fill(0),
    });
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('unexpected-response', (_req, res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c.slice(0, 1024)));
        res.on('end', () => {
          const status = res.statusCode ?? 0;
          const code = status === 401 ? 'E_AUTH' : status === 403 ? 'E_FORBIDDEN' : status === 503 ? 'E_UNREACHABLE' : 'E_PROTOCOL';
          ws.terminate();
          reject(new TidemarkError(code, body.trim() || `receiver refused the connection (HTTP ${status})`));
        });
      });
      ws.once('error', (err) => reject(unreachable(url, err)));
    });
    ws.removeAllListeners('error');
    return new ReceiverConnection(ws, options.bytesPerSecond ?? 0, options.heartbeatMs ?? HEARTBEAT_MS);
  }

  get isOpen(): boolean {
    return this.closedError === null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Opens the session (SPEC §3.6) and learns which of the messages added since release the receiver handles. */
  async hello(body: RequestBody<'hello'>): Promise<Reply<'hello'>> {
    const reply = await this.request('hello', body);
    this.receiverFeatures = new Set(reply.features ?? []);
    return reply;
  }

  /** Whether the receiver said in its hello that it handles `feature`: older receivers close the session on a message they do not know. */
  supports(feature: ReceiverFeature): boolean {
    return this.receiverFeatures.has(feature);
  }

  async request<T extends RequestType>(type: T, body: RequestBody<T>): Promise<Reply<T>> {
    return (await this.send(type, body)).reply;
  }

  /**
   * Sends a request once there is room, and resolves as soon as it is on its
   * way, with the reply still to come. A caller that must keep its requests
   * in order behind another's (batches of a sync) awaits the sends, not the
   * replies, and so keeps the link full.
   */
  async send<T extends RequestType>(type: T, body: RequestBody<T>): Promise<{ reply: Promise<Reply<T>> }> {
    if (this.closedError) throw this.closedError;
    // Wait for room *before* encoding: a caller may issue thousands of requests at once, and
    // encoded frames waiting their turn would hold a copy of every chunk in memory.
    await this.waitWritable();
    if (this.closedError) throw this.closedError;
    const rid = this.nextRid++;
    const frame = this.encode(type, body, rid);
    if (this.limiter) await this.limiter.take(frame.length);
    if (this.closedError) throw this.closedError;
    const reply = new Promise<Record<string, unknown>>((resolve, reject) => this.pending.set(rid, { type, resolve, reject }));
    this.unflushedBytes += frame.length;
    this.ws.send(frame, { binary: true }, () => {
      this.alive();
      this.unflushedBytes -= frame.length;
      this.frameRing.release(frame);
      this.wakeWriter();
    });
    // Room left: let the next waiting request go too (one at a time, so they do not all wake to re-check).
    if (this.unflushedBytes <= WRITE_HIGH_WATER_BYTES) this.wakeWriter();
    const parsed = reply.then((r) => parseReply(type, r));
    // A caller that gives up before awaiting the reply (an earlier request failed) must not leave an unhandled rejection.
    parsed.catch(() => {});
    return { reply: parsed };
  }

  /** chunk.put, most of what an agent sends, is written into reused memory; the rest by msgpackr. */
  private encode<T extends RequestType>(type: T, body: RequestBody<T>, rid: number): Buffer {
    if (type !== 'chunk.put') return encodeFrame({ ...body, t: type, rid });
    const { id, data } = body as RequestBody<'chunk.put'>;
    return chunkPutFrame(rid, id, data, (bytes) => this.frameRing.take(bytes));
  }

  close(): void {
    this.failAll(new TidemarkError('E_STATE', 'connection closed'));
    this.ws.close(1000);
  }

  private async waitWritable(): Promise<void> {
    while ((this.unflushedBytes > WRITE_HIGH_WATER_BYTES || this.writeWaiters.length > 0) && !this.closedError) {
      await new Promise<void>((resolve) => this.writeWaiters.push(resolve));
      if (this.unflushedBytes <= WRITE_HIGH_WATER_BYTES) return;
    }
  }

  private wakeWriter(): void {
    this.writeWaiters.shift()?.();
  }

  private wakeWriters(): void {
    const waiters = this.writeWaiters;
    this.writeWaiters = [];
    for (const wake of waiters) wake();
  }

  private onMessage(data: Buffer, isBinary: boolean): void {
    try {
      if (!isBinary) throw new TidemarkError('E_PROTOCOL', 'receiver sent a text frame');
      const reply = decodeReply(data);
      if (reply.t === 'error' && reply.rid === null) throw reply.error;
      const pending = this.pending.get(reply.rid!);
      if (!pending) throw new TidemarkError('E_PROTOCOL', `receiver replied to unknown request ${reply.rid}`);
      this.pending.delete(reply.rid!);
      if (reply.t === 'ok') pending.resolve(reply.body);
      else pending.reject(reply.error);
    } catch (err) {
      this.failAll(asTidemarkError(err));
      this.ws.terminate();
    }
  }

  private failAll(err: TidemarkError): void {
    clearInterval(this.heartbeat);
    if (!this.closedError) this.closedError = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.wakeWriters();
  }
}

/** Token bucket with one second of burst. */
class RateLimiter {
  private tokens: number;
  private lastMs = Date.now();

  constructor(private readonly bytesPerSecond: number) {
    this.tokens = bytesPerSecond;
  }

  async take(bytes: number): Promise<void> {
    for (;;) {
      const now = Date.now();
      this.tokens = Math.min(this.bytesPerSecond, this.tokens + ((now - this.lastMs) / 1000) * this.bytesPerSecond);
      this.lastMs = now;
      if (this.tokens >= Math.min(bytes, this.bytesPerSecond)) {
        this.tokens -= bytes;
        return;
      }
      await new Promise((r) => setTimeout(r, Math.ceil(((bytes - this.tokens) / this.bytesPerSecond) * 1000)));
    }
  }
}

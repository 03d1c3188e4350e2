// A WebSocket client written by hand over a pinned TLS socket, for tests that
// send what no library would: any upgrade request, frames with reserved bits,
// unknown opcodes, unmasked payloads, a length header with no body. Server
// frames are parsed as they arrive; `next()` hands them out in order, then
// the close frame and the end of the connection.
import { randomBytes } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import { connectPinned } from '../shared/connection.js';

export type RawEvent =
  | { kind: 'message'; opcode: number; data: Buffer }
  | { kind: 'close'; code: number | null; reason: string }
  | { kind: 'end' }
  | { kind: 'timeout' };

export interface UpgradeResult {
  /** HTTP status of the reply (101 on success), or null when the server closed without one. */
  status: number | null;
  /** What arrived after the reply's headers (a refusal's body), or the raw reply without headers. */
  body: string;
  /** A refused upgrade that announced `Connection: close`: the server closed the connection within `closeWaitMs`. */
  closed: boolean;
  ws?: RawWs;
}

export interface FrameOptions {
  opcode?: number;
  fin?: boolean;
  /** Bits 4–6 of the first byte (RSV1–3): must be 0 without extensions. */
  rsv?: number;
  /** Client frames must be masked; false sends one unmasked. */
  mask?: boolean;
  /** Claimed payload length, when it should differ from the bytes sent. */
  length?: number | bigint;
}

export function encodeWsFrame(payload: Buffer, o: FrameOptions = {}): Buffer {
  const opcode = o.opcode ?? 2;
  const mask = o.mask ?? true;
  const length = BigInt(o.length ?? payload.length);
  const head: number[] = [((o.fin ?? true) ? 0x80 : 0) | ((o.rsv ?? 0) << 4) | opcode];
  let ext = Buffer.alloc(0);
  if (length < 126n) head.push((mask ? 0x80 : 0) | Number(length));
  else if (length < 65536n) {
    head.push((mask ? 0x80 : 0) | 126);
    ext = Buffer.alloc(2);
    ext.writeUInt16BE(Number(length));
  } else {
    head.push((mask ? 0x80 : 0) | 127);
    ext = Buffer.alloc(8);
    ext.writeBigUInt64BE(length);
  }
  if (!mask) return Buffer.concat([Buffer.from(head), ext, payload]);
  const key = randomBytes(4);
  const masked = Buffer.allocUnsafe(payload.length);
  for (let i = 0; i < payload.length; i++) masked[i] = payload[i]! ^ key[i & 3]!;
  return Buffer.concat([Buffer.from(head), ext, key, masked]);
}

export class RawWs {
  private buffer: Buffer = Buffer.alloc(0);
  private readonly events: RawEvent[] = [];
  private waiter: ((e: RawEvent) => void) | null = null;
  private ended = false;

  constructor(readonly socket: TLSSocket, leftover: Buffer) {
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', () => {});
    socket.on('close', () => {
      this.ended = true;
      this.push({ kind: 'end' });
    });
    if (leftover.length > 0) this.onData(leftover);
  }

  /**
   * TLS (pinned) and an HTTP upgrade of `path` with `headers` (lines without CRLF;
   * none of the WebSocket ones are added when `bare` is set). `raw` replaces the
   * whole request.
   */
  static async upgrade(
    url: string, fingerprint: string, req: { path: string; headers: string[]; bare?: boolean; raw?: Buffer }, opts: { timeoutMs?: number; closeWaitMs?: number } = {},
  ): Promise<UpgradeResult> {
    const target = new URL(url);
    const socket = await connectPinned(target, fingerprint);
    const lines = [`GET ${req.path} HTTP/1.1`, `Host: ${target.host}`];
    if (!req.bare) lines.push('Upgrade: websocket', 'Connection: Upgrade', `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}`, 'Sec-WebSocket-Version: 13');
    socket.on('error', () => {});
    socket.write(req.raw ?? Buffer.from([...lines, ...req.headers, '', ''].join('\r\n'), 'latin1'));
    return new Promise((resolve) => {
      let received = Buffer.alloc(0);
      let status: number | null = null;
      let headerEnd = -1;
      let done = false;
      const finish = (result: UpgradeResult) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (!result.ws) {
          socket.removeAllListeners('data');
          socket.removeAllListeners('close');
          socket.destroy();
        }
        resolve(result);
      };
      const body = () => (headerEnd < 0 ? received : received.subarray(headerEnd + 4)).toString('latin1');
      const timer = setTimeout(() => finish({ status, body: `${body()} [timeout: no reply or close]`, closed: false }), opts.timeoutMs ?? 5000);
      socket.on('close', () => finish({ status, body: body(), closed: true }));
      socket.on('data', (d: Buffer) => {
        received = Buffer.concat([received, d]);
        if (headerEnd >= 0) return;
        headerEnd = received.indexOf('\r\n\r\n');
        if (headerEnd < 0) return;
        status = Number(/^HTTP\/1\.1 (\d{3})/.exec(received.subarray(0, headerEnd).toString('latin1'))?.[1] ?? 0);
        if (status === 101) {
          socket.removeAllListeners('data');
          socket.removeAllListeners('close');
          return finish({ status, body: '', closed: false, ws: new RawWs(socket, received.subarray(headerEnd + 4)) });
        }
        // A refusal that announces `Connection: close` is waited on (up to closeWaitMs) to see the close.
        const announcesClose = /\r\nconnection:\s*close/i.test(received.subarray(0, headerEnd + 2).toString('latin1'));
        if (!opts.closeWaitMs || !announcesClose) return finish({ status, body: body(), closed: false });
        clearTimeout(timer);
        setTimeout(() => finish({ status, body: body(), closed: false }), opts.closeWaitMs);
      });
    });
  }

  send(payload: Buffer, options?: FrameOptions): void {
    this.sendRaw(encodeWsFrame(payload, options));
  }

  sendRaw(bytes: Buffer): void {
    if (!this.ended && !this.socket.destroyed) this.socket.write(bytes);
  }

  /** The next server event, or `timeout`. */
  next(timeoutMs = 5000): Promise<RawEvent> {
    const queued = this.events.shift();
    if (queued) return Promise.resolve(queued);
    if (this.ended) return Promise.resolve({ kind: 'end' });
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        resolve({ kind: 'timeout' });
      }, timeoutMs);
      this.waiter = (e) => {
        clearTimeout(timer);
        resolve(e);
      };
    });
  }

  get isEnded(): boolean {
    return this.ended;
  }

  destroy(): void {
    this.socket.destroy();
  }

  private push(e: RawEvent): void {
    const waiter = this.waiter;
    if (waiter) {
      this.waiter = null;
      waiter(e);
    } else this.events.push(e);
  }

  private onData(d: Buffer): void {
    this.buffer = this.buffer.length === 0 ? d : Buffer.concat([this.buffer, d]);
    for (;;) {
      if (this.buffer.length < 2) return;
      const opcode = this.buffer[0]! & 0x0f;
      let length = this.buffer[1]! & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (this.buffer.length < 4) return;
        length = this.buffer.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (this.buffer.length < 10) return;
        length = Number(this.buffer.readBigUInt64BE(2));
        offset = 10;
      }
      if (this.buffer.length < offset + length) return;
      const payload = this.buffer.subarray(offset, offset + length);
      this.buffer = this.buffer.subarray(offset + length);
      if (opcode === 0x8) {
        this.push({ kind: 'close', code: payload.length >= 2 ? payload.readUInt16BE(0) : null, reason: payload.subarray(2).toString() });
      } else if (opcode === 0x9) {
        this.sendRaw(encodeWsFrame(payload, { opcode: 0xa })); // answer pings like a live client
      } else if (opcode !== 0xa) {
        this.push({ kind: 'message', opcode, data: Buffer.from(payload) });
      }
    }
  }
}

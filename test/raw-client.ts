// A raw protocol client for tests: sends frames no honest client sends (other
// hosts' ids, foreign chunk ids, mismatched vault proofs) and returns every
// reply, ok or error, as the decoded map.
import WebSocket from 'ws';
import { Packr } from 'msgpackr';
import { connectPinned } from '../shared/connection.js';
import { ENROLL_PATH, MAX_FRAME_BYTES, PROTOCOL_HEADER, SESSION_PATH, encodeFrame } from '../shared/protocol.js';

const packr = new Packr({ mapsAsObjects: true, useRecords: false });

export interface RawReply {
  t: 'ok' | 'error';
  rid: number | null;
  code?: string;
  message?: string;
  [field: string]: any;
}

export class RawClient {
  private nextRid = 1;
  private readonly pending = new Map<number, (reply: RawReply) => void>();
  readonly closed: Promise<number>;

  private constructor(private readonly ws: WebSocket) {
    ws.on('message', (data: Buffer) => {
      const reply = packr.unpack(data) as RawReply;
      const resolve = reply.rid === null ? undefined : this.pending.get(reply.rid);
      if (resolve) {
        this.pending.delete(reply.rid!);
        resolve(reply);
      }
    });
    ws.on('error', () => {});
    this.closed = new Promise((resolve) => ws.once('close', (code: number) => {
      for (const r of this.pending.values()) r({ t: 'error', rid: null, code: 'CLOSED', message: `closed ${code}` });
      this.pending.clear();
      resolve(code);
    }));
  }

  /** `secret`: an agent credential or restore token (session), or an enrollment token (`enroll: true`). */
  static async open(receiverUrl: string, fingerprint: string, secret: string, enroll = false): Promise<RawClient> {
    const url = new URL(receiverUrl);
    const socket = await connectPinned(url, fingerprint);
    const ws = new WebSocket(new URL(enroll ? ENROLL_PATH : SESSION_PATH, url), {
      createConnection: () => socket,
      headers: { authorization: `${enroll ? 'Token' : 'Bearer'} ${secret}`, [PROTOCOL_HEADER]: '1' },
      perMessageDeflate: false,
      maxPayload: MAX_FRAME_BYTES,
    });
    await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
    return new RawClient(ws);
  }

  request(t: string, body: Record<string, unknown> = {}): Promise<RawReply> {
    if (this.ws.readyState !== WebSocket.OPEN) return Promise.resolve({ t: 'error', rid: null, code: 'CLOSED', message: 'not open' });
    const rid = this.nextRid++;
    const reply = new Promise<RawReply>((resolve) => this.pending.set(rid, resolve));
    this.ws.send(encodeFrame({ ...body, t, rid }), { binary: true });
    return reply;
  }

  close(): void {
    this.ws.close(1000);
  }
}

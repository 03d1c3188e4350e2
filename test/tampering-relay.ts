// A hostile receiver for tests of the restore side: it holds the real receiver's
// TLS key (so clients that pin its fingerprint connect to it), relays every
// request to the real receiver and every reply back, and lets a test rewrite
// the replies of chosen request types on the way (point maps out of order,
// wrong sizes, paging that does not advance). Loopback only.
import { createServer, type Server } from 'node:https';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import WebSocket, { WebSocketServer } from 'ws';
import { Packr } from 'msgpackr/pack';
import { connectPinned } from '../shared/connection.js';
import { MAX_FRAME_BYTES, PROTOCOL_HEADER } from '../shared/protocol.js';
import type { ReceiverProcess } from './harness.js';

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' });

/** Returns the reply to send instead (the same object, changed or not). */
export type Tamper = (type: string, reply: Record<string, any>, request: Record<string, any>) => Record<string, any>;

export class TamperingRelay {
  /** What to do to replies; replaced by each test. */
  tamper: Tamper = (_type, reply) => reply;
  private readonly sockets = new Set<WebSocket>();

  private constructor(private readonly https: Server) {}

  static async start(receiver: ReceiverProcess): Promise<TamperingRelay> {
    const tls = join(receiver.dataDir, 'tls');
    const https = createServer({ key: readFileSync(join(tls, 'key.pem')), cert: readFileSync(join(tls, 'cert.pem')) });
    const relay = new TamperingRelay(https);
    const wss = new WebSocketServer({ server: https, perMessageDeflate: false, maxPayload: MAX_FRAME_BYTES });
    wss.on('connection', (client, req) => void relay.connect(receiver, client, req.url!, req.headers.authorization ?? ''));
    await new Promise<void>((resolve) => https.listen(0, '127.0.0.1', resolve));
    return relay;
  }

  get url(): string {
    return `wss://127.0.0.1:${(this.https.address() as AddressInfo).port}`;
  }

  private async connect(receiver: ReceiverProcess, client: WebSocket, path: string, authorization: string): Promise<void> {
    this.sockets.add(client);
    // Listening before anything is awaited: the client sends hello as soon as it is open.
    const requests = new Map<number, Record<string, any>>();
    const queued: Buffer[] = [];
    let upstream: WebSocket | null = null;
    client.on('message', (data: Buffer) => {
      const request = packr.unpack(data) as Record<string, any>;
      requests.set(request.rid, request);
      if (upstream?.readyState === WebSocket.OPEN) upstream.send(data);
      else queued.push(data);
    });
    const end = () => {
      client.terminate();
      upstream?.terminate();
    };
    client.on('close', end).on('error', end);
    const socket = await connectPinned(new URL(receiver.url), receiver.fingerprint);
    upstream = new WebSocket(new URL(path, receiver.url), {
      createConnection: () => socket, headers: { authorization, [PROTOCOL_HEADER]: '1' }, perMessageDeflate: false, maxPayload: MAX_FRAME_BYTES,
    });
    this.sockets.add(upstream);
    upstream.on('open', () => queued.splice(0).forEach((data) => upstream!.send(data)));
    upstream.on('message', (data: Buffer) => {
      const reply = packr.unpack(data) as Record<string, any>;
      const request = requests.get(reply.rid);
      requests.delete(reply.rid);
      client.send(request && reply.t === 'ok' ? packr.pack(this.tamper(request.t, reply, request)) : data);
    });
    upstream.on('close', end).on('error', end);
  }

  async close(): Promise<void> {
    for (const ws of this.sockets) ws.terminate();
    await new Promise<void>((resolve) => this.https.close(() => resolve()));
  }
}

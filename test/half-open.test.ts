// A receiver that vanishes without closing the TCP connection (power loss, a
// partition, a stateful firewall dropping the flow) must not stall a client
// forever: the client's heartbeat gives up on a silent link and the request
// fails E_UNREACHABLE, so that the agent's retry loop reconnects. The silent
// link is a real TCP relay between client and receiver that stops relaying
// in both directions while keeping both sockets open.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { SESSION_PATH } from '../shared/protocol.js';
import { Deployment } from './harness.js';
import { vaultKeys } from './point-check.js';

const HEARTBEAT_MS = 300;

class FreezableRelay {
  private readonly sockets: Socket[] = [];
  private frozen = false;
  private constructor(private readonly server: Server) {}

  static async start(targetPort: number): Promise<FreezableRelay> {
    const server = createServer();
    const relay = new FreezableRelay(server);
    server.on('connection', (client) => {
      const upstream = connect(targetPort, '127.0.0.1');
      relay.sockets.push(client, upstream);
      const forward = (from: Socket, to: Socket) => from.on('data', (data) => {
        if (!relay.frozen) to.write(data);
      });
      forward(client, upstream);
      forward(upstream, client);
      client.on('error', () => upstream.destroy());
      upstream.on('error', () => client.destroy());
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return relay;
  }

  get url(): string {
    return `wss://127.0.0.1:${(this.server.address() as { port: number }).port}`;
  }

  /** From now on nothing passes either way, and nothing is closed. */
  freeze(): void {
    this.frozen = true;
  }

  close(): void {
    for (const s of this.sockets) s.destroy();
    this.server.close();
  }
}

describe('a half-open link to the receiver', () => {
  let d: Deployment;
  let relay: FreezableRelay;
  before(async () => {
    d = await Deployment.start();
    await d.enroll('kappa');
    relay = await FreezableRelay.start(d.receiver.port);
  });
  after(async () => {
    relay?.close();
    await d?.close();
  });

  it('fails a pending request E_UNREACHABLE after two silent heartbeats instead of waiting forever', { timeout: 30_000 }, async () => {
    const keys = vaultKeys(d.keyFile);
    const conn = await ReceiverConnection.open({
      url: relay.url, fingerprint: d.receiver.fingerprint, path: SESSION_PATH, authorization: `Bearer ${d.restoreToken}`, heartbeatMs: HEARTBEAT_MS,
    });
    try {
      await conn.hello({ vaultId: keys.vaultId, vaultProof: keys.vaultProof });
      // A healthy but idle link stays up across several heartbeats: the receiver answers the pings.
      await new Promise((r) => setTimeout(r, 5 * HEARTBEAT_MS));
      assert.ok(conn.isOpen, 'an idle link that answers pings is kept');
      await conn.request('points.list', { host: null, afterId: null });

      relay.freeze();
      const startedMs = Date.now();
      const err = await conn.request('points.list', { host: null, afterId: null }).then(
        () => assert.fail('a request over a frozen link was answered'),
        (e: unknown) => e,
      );
      assert.ok(err instanceof TidemarkError);
      assert.equal(err.code, 'E_UNREACHABLE');
      assert.match(err.message, /did not answer/);
      assert.equal(err.retryable, true);
      assert.ok(Date.now() - startedMs < 20 * HEARTBEAT_MS, `given up after ${Date.now() - startedMs} ms`);
      assert.equal(conn.isOpen, false);
    } finally {
      conn.close();
    }
  });
});

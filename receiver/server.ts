// The receiver's network face: HTTPS with the receiver's own certificate,
// authentication on the HTTP upgrade (before any WebSocket exists), then one
// Session per connection. Heartbeats find half-open links.
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, type Server } from 'node:https';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { WebSocketServer, type WebSocket } from 'ws';
import { TidemarkError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { CLOSE_REVOKED, ENROLL_PATH, MAX_FRAME_BYTES, PROTOCOL_HEADER, PROTOCOL_VERSION, SESSION_PATH } from '../shared/protocol.js';
import { Catalog, type Principal } from './catalog.js';
import { UPGRADE_TIMEOUT_MS, UpgradeGate } from './admission.js';
import { acquireServeLock, type DataDir } from './data-dir.js';
import type { RetentionPolicy } from './retention.js';
import { LocalPackStore } from './pack-store.js';
import { Session } from './session.js';

const HEARTBEAT_MS = 15_000;
/** The receiver CLI (receiver/cli.ts, compiled beside this module): scheduled prunes run its `prune`. */
const RECEIVER_CLI = fileURLToPath(new URL('./cli.js', import.meta.url));

export interface PruneSchedule {
  policy: RetentionPolicy;
  /** 0: never prune on a schedule. */
  intervalMs: number;
}
const MAX_CONNECTIONS = 256;
/**
 * Sessions one secret may hold open at once. An agent uses one (two while a dead link awaits its
 * heartbeat), a restore one per command; without a cap, one credential or restore token could take
 * all MAX_CONNECTIONS and lock every other host out (503).
 */
export const MAX_SESSIONS_PER_SECRET = 64;

export class ReceiverServer {
  private readonly alive = new WeakSet<WebSocket>();
  /** What each session authenticated as, checked again at every heartbeat (beat). */
  private readonly principals = new WeakMap<WebSocket, Principal>();
  /** Open sessions per secret (hex of its hash). */
  private readonly sessionsPerSecret = new Map<string, number>();
  private heartbeat: NodeJS.Timeout | null = null;
  private pruneTimer: NodeJS.Timeout | null = null;
  private pruning: ChildProcess | null = null;
  private closing = false;
  private releaseLock: () => void = () => {};
  /** Connections that have not completed an upgrade: capped and timed out (receiver/admission.ts). */
  private readonly gate: UpgradeGate;

  private constructor(
    private readonly https: Server,
    private readonly wss: WebSocketServer,
    private readonly catalog: Catalog,
    private readonly store: LocalPackStore,
    private readonly log: Logger,
  ) {
    this.gate = new UpgradeGate(https, log);
  }

  static async start(dataDir: DataDir, host: string, port: number, log: Logger, schedule: PruneSchedule): Promise<ReceiverServer> {
    const releaseLock = acquireServeLock(dataDir.root);
    const catalog = Catalog.open(dataDir.catalogPath);
    try {
      catalog.sealAllPacks();
    } catch (err) {
      // A full disk must not keep the receiver down: packs of the dead writer stay unsealed
      // (never appended to, only not yet compactable) until a later start seals them.
      log.warn({ err: (err as Error).message }, 'could not seal the packs of the previous run; continuing');
    }
    const store = new LocalPackStore(dataDir.packDir, catalog);
    const https = createServer({ key: dataDir.keyPem, cert: dataDir.certPem, minVersion: 'TLSv1.2', handshakeTimeout: UPGRADE_TIMEOUT_MS }, (_req, res) => {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('tidemark receiver: connect with a WebSocket\n');
    });
    https.headersTimeout = UPGRADE_TIMEOUT_MS;
    https.requestTimeout = UPGRADE_TIMEOUT_MS;
    const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: MAX_FRAME_BYTES });
    const server = new ReceiverServer(https, wss, catalog, store, log);
    https.on('upgrade', (req, socket, head) => {
      // Nothing an unauthenticated peer sends may escape this listener: an exception here would end the process.
      try {
        server.onUpgrade(req, socket, head);
      } catch (err) {
        log.error({ err, remote: req.socket.remoteAddress }, 'upgrade failed');
        socket.destroy();
      }
    });
    https.on('tlsClientError', (err) => log.debug({ err: err.message }, 'TLS handshake failed'));
    try {
      await new Promise<void>((resolve, reject) => {
        https.once('error', (err) => reject(listenError(err as NodeJS.ErrnoException, host, port)));
        https.listen(port, host, () => resolve());
      });
    } catch (err) {
      catalog.close();
      releaseLock();
      throw err;
    }
    server.releaseLock = releaseLock;
    server.heartbeat = setInterval(() => server.beat(), HEARTBEAT_MS);
    if (schedule.intervalMs > 0) server.pruneTimer = setInterval(() => server.scheduledPrune(dataDir.root, schedule.policy), schedule.intervalMs);
    return server;
  }

  address(): AddressInfo {
    return this.https.address() as AddressInfo;
  }

  async close(): Promise<void> {
    this.closing = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.pruneTimer) clearInterval(this.pruneTimer);
    await this.stopPrune();
    this.gate.close();
    for (const ws of this.wss.clients) ws.close(1001, 'receiver shutting down');
    await new Promise<void>((resolve) => this.https.close(() => resolve()));
    this.https.closeAllConnections();
    await this.store.close();
    this.catalog.close();
    this.releaseLock();
  }

  /**
   * Retention runs here, on the receiver's clock; no client can ask for a deletion. It runs as
   * a `prune` child process, the same as one run by hand beside serve: compaction copies pack
   * data and prune waits for the catalog's write lock, and on serve's event loop either would
   * stall every session (and its heartbeats) for as long as it takes.
   */
  private scheduledPrune(dataRoot: string, policy: RetentionPolicy): void {
    if (this.pruning) return void this.log.warn('scheduled prune skipped: the previous one is still running');
    const flags = ['--keep-within', `${policy.keepWithinMs}ms`, '--keep-hourly', String(policy.keepHourly), '--keep-daily', String(policy.keepDaily), '--keep-weekly', String(policy.keepWeekly)];
    // Its log lines (at serve's level) join serve's log whole; the last one explains a failure.
    const child = spawn(process.execPath, [RECEIVER_CLI, 'prune', '--data', dataRoot, ...flags], {
      stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, TIDEMARK_LOG_LEVEL: this.log.level },
    });
    this.pruning = child;
    let partial = '';
    let lastLine = '';
    const forward = (line: string) => {
      if (!line) return;
      process.stderr.write(`${line}\n`);
      lastLine = line;
    };
    child.stderr!.setEncoding('utf8').on('data', (text: string) => {
      const lines = (partial + text).split('\n');
      partial = lines.pop()!;
      lines.forEach(forward);
    });
    child.on('error', (err) => {
      this.pruning = null;
      this.log.error({ err: err.message }, 'scheduled prune could not start; will retry at the next interval');
    });
    child.on('close', (code, signal) => {
      this.pruning = null;
      forward(partial);
      if (code === 0) return;
      if (this.closing) this.log.info({ signal }, 'scheduled prune stopped with serve');
      else this.log.error({ code, signal, reason: lastLine }, 'scheduled prune failed; will retry at the next interval');
    });
  }

  /** Shutdown does not wait for a running prune to finish: one cut short is safe (prune is crash-safe). */
  private async stopPrune(): Promise<void> {
    const child = this.pruning;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const closed = new Promise((resolve) => child.once('close', resolve));
    child.kill('SIGTERM');
    await closed;
  }

  private onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    socket.on('error', () => socket.destroy());
    let path: string;
    try {
      path = new URL(req.url ?? '/', 'https://receiver').pathname;
    } catch {
      return refuse(socket, 400, 'invalid request target'); // e.g. `GET //` or `GET http://[`: not a URL at all
    }
    if (path !== ENROLL_PATH && path !== SESSION_PATH) return refuse(socket, 404, `unknown path ${path}`);
    if (req.headers[PROTOCOL_HEADER] !== String(PROTOCOL_VERSION)) {
      return refuse(socket, 426, `unsupported protocol version ${String(req.headers[PROTOCOL_HEADER])}; this receiver speaks ${PROTOCOL_VERSION}: upgrade the client`);
    }
    if (this.wss.clients.size >= MAX_CONNECTIONS) return refuse(socket, 503, 'receiver has too many connections; retry later');
    const principal = this.authenticate(path, req.headers.authorization);
    if (!principal) {
      const message = path === ENROLL_PATH
        ? 'enrollment token unknown or already used (or expired, or revoked); create a new one with tidemark-receiver token'
        : 'credential not recognized by this receiver (revoked, expired, or made by another receiver): re-enroll the host with a token from tidemark-receiver token --host NAME, or use a valid restore token';
      this.log.warn({ path, remote: req.socket.remoteAddress }, 'authentication refused');
      return refuse(socket, 401, message);
    }
    const secret = secretKeyOf(principal);
    if ((this.sessionsPerSecret.get(secret) ?? 0) >= MAX_SESSIONS_PER_SECRET) {
      this.log.warn({ role: principal.role, host: principal.role === 'agent' ? principal.host : undefined, remote: req.socket.remoteAddress }, 'too many sessions for one credential');
      return refuse(socket, 503, `this credential already has ${MAX_SESSIONS_PER_SECRET} open sessions; close some, or retry later`);
    }
    this.wss.handleUpgrade(req, socket, head, (ws) => {
      this.gate.upgraded(req.socket);
      this.sessionsPerSecret.set(secret, (this.sessionsPerSecret.get(secret) ?? 0) + 1);
      ws.once('close', () => {
        const left = this.sessionsPerSecret.get(secret)! - 1;
        if (left > 0) this.sessionsPerSecret.set(secret, left);
        else this.sessionsPerSecret.delete(secret);
      });
      this.principals.set(ws, principal);
      this.alive.add(ws);
      ws.on('pong', () => this.alive.add(ws));
      ws.on('error', (err) => this.log.debug({ err: err.message }, 'connection error'));
      new Session(ws, principal, { catalog: this.catalog, store: this.store, log: this.log });
    });
  }

  private authenticate(path: string, header: string | undefined): Principal | undefined {
    const match = /^(Bearer|Token) (\S{1,200})$/.exec(header ?? '');
    if (!match) return undefined;
    const scheme = match[1] as 'Bearer' | 'Token';
    if ((path === ENROLL_PATH) !== (scheme === 'Token')) return undefined;
    return this.catalog.authenticate(scheme, match[2]!);
  }

  /** A catalog that cannot be read now closes no session: the next heartbeat checks again. */
  private stillValid(principal: Principal): boolean {
    try {
      return this.catalog.stillValid(principal);
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'could not check a session\'s credential; checking again at the next heartbeat');
      return true;
    }
  }

  /** Pings every session, ends those that did not answer the last ping, and those whose secret was revoked or expired since. */
  private beat(): void {
    for (const ws of this.wss.clients) {
      if (!this.alive.has(ws)) {
        ws.terminate();
        continue;
      }
      const principal = this.principals.get(ws);
      if (principal && !this.stillValid(principal)) {
        this.log.warn({ role: principal.role, host: principal.role === 'agent' ? principal.host : undefined }, 'closing session: its credential was revoked or expired');
        ws.close(CLOSE_REVOKED, 'credential revoked or expired');
        continue;
      }
      this.alive.delete(ws);
      ws.ping();
    }
  }
}

function secretKeyOf(p: Principal): string {
  return (p.role === 'enroll' ? p.tokenHash : p.secretHash).toString('hex');
}

const statusText: Record<number, string> = { 400: 'Bad Request', 401: 'Unauthorized', 404: 'Not Found', 426: 'Upgrade Required', 503: 'Service Unavailable' };

function refuse(socket: Duplex, status: number, message: string): void {
  const body = `${message}\n`;
  socket.end(`HTTP/1.1 ${status} ${statusText[status]}\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}

/** Why --listen HOST:PORT cannot be served, as a setting to change rather than a bug. */
function listenError(err: NodeJS.ErrnoException, host: string, port: number): Error {
  const at = `--listen ${host}:${port}`;
  if (err.code === 'EADDRINUSE') return new TidemarkError('E_CONFLICT', `${at}: the address is in use (another serve or program listens there); stop it or choose another port`, { cause: err });
  if (err.code === 'EADDRNOTAVAIL') return new TidemarkError('E_USAGE', `${at}: this host has no address ${host}; use one of its addresses, or 0.0.0.0`, { cause: err });
  if (err.code === 'EACCES') return new TidemarkError('E_USAGE', `${at}: ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a higher port`, { cause: err });
  return err;
}

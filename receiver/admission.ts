// Admission of connections before they are sessions (docs/SPEC.md §3.1, §10).
//
// From TCP accept until the WebSocket upgrade completes, a connection is
// *pending*: it holds a socket, a TLS session and an HTTP parser but has proved
// nothing. Pending connections are bounded in number, in total and per source
// address, and in time: each is destroyed if it has not completed the upgrade
// within UPGRADE_TIMEOUT_MS of its accept, whatever it did meanwhile (no TLS
// hello, a stalled handshake, no request, a refused upgrade the peer keeps
// open, plain HTTP requests on a kept-alive connection). When a cap is reached
// the *oldest* pending connection is closed to admit the new one if it has
// waited at least EVICT_AFTER_MS (a stalled peer), so idle connections cannot
// lock out a client that completes its upgrade promptly; otherwise the new
// connection is refused (reset), so a burst of clients completing their
// handshakes (many agents behind one NAT) is not broken up.
import type { Server } from 'node:https';
import type { Socket } from 'node:net';
import type { Logger } from '../shared/log.js';

/** From TCP accept to a completed WebSocket upgrade (TLS handshake, HTTP request, authentication). */
export const UPGRADE_TIMEOUT_MS = 10_000;
/** Connections that have not completed an upgrade, in total ... */
export const MAX_PENDING = 256;
/** ... and per source address. */
export const MAX_PENDING_PER_ADDRESS = 64;
/** A pending connection this old may be closed to make room; a younger one is still handshaking. */
export const EVICT_AFTER_MS = 1000;
/** At most one warning per this interval while caps are being hit. */
const WARN_EVERY_MS = 60_000;

interface Pending {
  socket: Socket;
  address: string;
  timer: NodeJS.Timeout;
  sinceMs: number;
}

export interface AdmissionLimits {
  upgradeTimeoutMs: number;
  maxPending: number;
  maxPendingPerAddress: number;
}

export class UpgradeGate {
  /** By `address|port`, oldest first (Map keeps insertion order). */
  private readonly pending = new Map<string, Pending>();
  private lastWarnMs = 0;
  private evictedSinceWarn = 0;
  private refusedSinceWarn = 0;
  private readonly limits: AdmissionLimits;

  constructor(
    server: Server,
    private readonly log: Logger,
    limits: Partial<AdmissionLimits> = {},
  ) {
    this.limits = { upgradeTimeoutMs: UPGRADE_TIMEOUT_MS, maxPending: MAX_PENDING, maxPendingPerAddress: MAX_PENDING_PER_ADDRESS, ...limits };
    // 'connection' carries the raw TCP socket, before TLS.
    server.on('connection', (socket: Socket) => this.admit(socket));
  }

  /** The WebSocket upgrade of this (TLS) socket completed: it is a session now, no longer pending. */
  upgraded(socket: { remoteAddress?: string; remotePort?: number }): void {
    const key = keyOf(socket);
    const entry = key === null ? undefined : this.pending.get(key);
    if (!entry) return;
    clearTimeout(entry.timer);
    this.pending.delete(key!);
  }

  get pendingCount(): number {
    return this.pending.size;
  }

  close(): void {
    for (const entry of this.pending.values()) clearTimeout(entry.timer);
    this.pending.clear();
  }

  private admit(socket: Socket): void {
    const key = keyOf(socket);
    if (key === null) return void socket.destroy();
    const address = socket.remoteAddress!;
    let sameAddress = 0;
    let oldestOfAddress: string | undefined;
    for (const [k, entry] of this.pending) {
      if (entry.address !== address) continue;
      sameAddress++;
      oldestOfAddress ??= k;
    }
    const cap = sameAddress >= this.limits.maxPendingPerAddress ? 'per-address' : this.pending.size >= this.limits.maxPending ? 'total' : null;
    if (cap !== null) {
      const oldest = cap === 'per-address' ? oldestOfAddress! : this.pending.keys().next().value!;
      if (Date.now() - this.pending.get(oldest)!.sinceMs < EVICT_AFTER_MS) {
        this.refusedSinceWarn++;
        this.warn(cap, address);
        return void socket.destroy();
      }
      this.evict(oldest, cap);
    }
    const timer = setTimeout(() => {
      if (this.pending.get(key)?.socket !== socket) return;
      this.pending.delete(key);
      this.log.debug({ remote: address }, 'connection closed: no WebSocket upgrade within the timeout');
      socket.destroy();
    }, this.limits.upgradeTimeoutMs);
    timer.unref();
    this.pending.set(key, { socket, address, timer, sinceMs: Date.now() });
    socket.once('close', () => {
      const entry = this.pending.get(key);
      if (entry?.socket !== socket) return;
      clearTimeout(entry.timer);
      this.pending.delete(key);
    });
  }

  private evict(key: string, cap: 'per-address' | 'total'): void {
    const entry = this.pending.get(key)!;
    clearTimeout(entry.timer);
    this.pending.delete(key);
    entry.socket.destroy();
    this.evictedSinceWarn++;
    this.warn(cap, entry.address);
  }

  private warn(cap: 'per-address' | 'total', remote: string): void {
    const now = Date.now();
    if (now - this.lastWarnMs < WARN_EVERY_MS) return;
    this.log.warn({ cap, remote, closedOldest: this.evictedSinceWarn, refusedNew: this.refusedSinceWarn, pending: this.pending.size },
      'too many connections without a completed upgrade: closing the oldest stalled ones, refusing new ones meanwhile');
    this.lastWarnMs = now;
    this.evictedSinceWarn = 0;
    this.refusedSinceWarn = 0;
  }
}

function keyOf(socket: { remoteAddress?: string; remotePort?: number }): string | null {
  return socket.remoteAddress === undefined || socket.remotePort === undefined ? null : `${socket.remoteAddress}|${socket.remotePort}`;
}

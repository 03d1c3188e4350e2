// One authenticated WebSocket connection: validates each request, checks that
// the principal may make it, and answers. The receiver distrusts the agent:
// sizes and shapes are checked before use, chunks referenced by a point must
// be stored in the caller's vault, and a point becomes visible only on an
// explicit, checked commit.
import type WebSocket from 'ws';
import { checkEnvelopeShape } from '../shared/chunk-crypto.js';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { MAX_BLOCK_BYTES, MAX_GET_REPLY_BYTES, MAX_POINTS_PAGE, RECEIVER_FEATURES, chunksReplyFrame, decodeRequest, errorFrame, okFrame, peekRid, type Request } from '../shared/protocol.js';
import type { Catalog, Principal } from './catalog.js';
import type { ChunkStore } from './pack-store.js';
import { checkVaultProof, enrollWithProof } from './vault-proof.js';
import { storageAlarm } from './storage-alarm.js';

const MAX_IN_FLIGHT = 64;
/**
 * Reply bytes handed to the socket but not yet written out. Above this, reading pauses: a
 * client that pipelines chunks.get and never reads (~1 MiB of reply per 2 KiB request)
 * would otherwise grow the receiver's memory until it is killed, with every session.
 */
export const MAX_UNSENT_REPLY_BYTES = 16 * 1024 * 1024;

export interface SessionContext {
  catalog: Catalog;
  store: ChunkStore;
  log: Logger;
}

export class Session {
  private vaultId: string | null = null;
  private inFlight = 0;
  private unsentBytes = 0;
  private paused = false;
  /**
   * Settles once every chunk.put and blocks.put received so far has. Staging and
   * commits wait on it: an agent may send a batch's blocks.put right behind its
   * chunk.puts, and a block staged twice keeps the version sent last.
   */
  private received: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly ws: WebSocket,
    private readonly principal: Principal,
    private readonly ctx: SessionContext,
  ) {
    ws.on('message', (data: Buffer, isBinary: boolean) => this.onFrame(data, isBinary));
  }

  private onFrame(data: Buffer, isBinary: boolean): void {
    if (!isBinary) return this.fatal(new TidemarkError('E_PROTOCOL', 'text frames are not part of the protocol'), 1003);
    let request: Request;
    try {
      request = decodeRequest(data);
    } catch (err) {
      // A frame we cannot understand ends the session: the peer is out of step with us.
      return this.fatal(asTidemarkError(err), 1002, peekRid(data));
    }
    this.inFlight++;
    this.flow();
    this.handle(request)
      .then((body) => {
        if (request.t === 'point.commit') storageAlarm(this.ctx.log).succeeded();
        this.send(request.t === 'chunks.get' ? chunksReplyFrame(request.rid, (body as { data: Buffer[] }).data) : okFrame(request.rid, body));
      })
      .catch((err) => {
        const error = asTidemarkError(err, { storage: 'receiver' });
        // A full disk fails every chunk of a batch and every retry: logged once per failure, not per request.
        if (error.code === 'E_STORAGE') storageAlarm(this.ctx.log).failed(error, { type: request.t });
        else if (error.code === 'E_INTERNAL') this.ctx.log.error({ err, type: request.t }, 'request failed');
        this.send(errorFrame(request.rid, error));
      })
      .finally(() => {
        this.inFlight--;
        this.flow();
      });
  }

  /** Reading pauses while too many requests are in flight or too many reply bytes wait for the peer, and resumes at half of each. */
  private flow(): void {
    if (!this.paused && (this.inFlight >= MAX_IN_FLIGHT || this.unsentBytes > MAX_UNSENT_REPLY_BYTES)) {
      this.paused = true;
      this.ws.pause();
    } else if (this.paused && this.inFlight < MAX_IN_FLIGHT / 2 && this.unsentBytes <= MAX_UNSENT_REPLY_BYTES / 2) {
      this.paused = false;
      this.ws.resume();
    }
  }

  private send(frame: Buffer): void {
    if (this.ws.readyState !== this.ws.OPEN) return;
    this.unsentBytes += frame.length;
    // Called once the frame is written to the socket, or with an error once it never will be.
    this.ws.send(frame, { binary: true }, () => {
      this.unsentBytes -= frame.length;
      this.flow();
    });
  }

  private fatal(err: TidemarkError, closeCode: number, rid: number | null = null): void {
    this.ctx.log.warn({ code: err.code, reason: err.message }, 'closing session on protocol error');
    this.send(errorFrame(rid, err));
    this.ws.close(closeCode, err.message.slice(0, 120));
  }

  private async handle(req: Request): Promise<object> {
    const p = this.principal;
    if (req.t === 'enroll') {
      if (p.role !== 'enroll') throw new TidemarkError('E_FORBIDDEN', 'enroll needs an enrollment token');
      const enrolled = enrollWithProof(this.ctx.catalog, p.tokenHash, req.host, req.vaultId, req.vaultProof);
      this.ctx.log.info({ host: req.host, vaultId: req.vaultId }, 'host enrolled');
      setImmediate(() => this.ws.close(1000));
      return enrolled;
    }
    if (p.role === 'enroll') throw new TidemarkError('E_FORBIDDEN', 'an enrollment token can only enroll');
    if (req.t === 'hello') return this.hello(p, req.vaultId, req.vaultProof);
    const vaultId = this.vaultId;
    if (vaultId === null) throw new TidemarkError('E_PROTOCOL', `${req.t} before hello`);

    switch (req.t) {
      case 'points.list': {
        if (p.role === 'agent' && req.host !== null && req.host !== p.host) throw this.otherHost(req.host);
        const page = this.ctx.catalog.listPoints(vaultId, p.role === 'agent' ? p.host : req.host, req.afterId, MAX_POINTS_PAGE);
        // A host with no points yet and a misspelt name both list nothing: say which it is.
        return req.host === null ? page : { ...page, hostExists: this.ctx.catalog.hostInVault(vaultId, req.host) };
      }
      case 'point.map': {
        this.readablePoint(p, vaultId, req.pointId);
        const disk = this.ctx.catalog.disk(req.diskId);
        const owner = this.ctx.catalog.pointOwner(req.pointId)!;
        if (!disk || disk.hostId !== owner.hostId) throw new TidemarkError('E_NOT_FOUND', `disk ${req.diskId} is not part of point ${req.pointId}`);
        return this.ctx.catalog.pointMap(req.pointId, req.diskId, req.fromBlock, req.limit);
      }
      case 'chunk.get':
        return { data: await this.ctx.store.get(vaultId, req.id) };
      case 'chunks.get':
        return { data: await this.readChunks(vaultId, req.ids) };
    }

    if (p.role !== 'agent') throw new TidemarkError('E_FORBIDDEN', `${req.t}: restore credentials are read-only`);
    switch (req.t) {
      case 'disk.register':
        return this.ctx.catalog.registerDisk(p.hostId, req.name, req.sizeBytes, req.sectorBytes, req.blockBytes);
      case 'point.begin':
        return this.ctx.catalog.beginPoint(p.hostId, req.resume);
      case 'chunks.query':
        return { missing: req.ids.flatMap((id, i) => (this.ctx.catalog.hasChunk(vaultId, id) ? [] : [i])) };
      case 'chunk.put': {
        checkEnvelopeShape(req.data, MAX_BLOCK_BYTES);
        const stored = this.ctx.store.put(vaultId, req.id, req.data);
        this.received = Promise.allSettled([this.received, stored]);
        return { stored: await stored };
      }
      case 'blocks.put':
        return this.afterReceived(() => this.stage(p, vaultId, req));
      case 'point.commit':
        return this.afterReceived(() => {
          const skewMs = req.timeMs - Date.now();
          if (skewMs > 5 * 60_000) throw new TidemarkError('E_PROTOCOL', `point time is ${Math.round(skewMs / 1000)} s in the receiver's future; fix the agent's clock`);
          const discarded = this.ctx.catalog.commitPoint(p.hostId, req.pointId, req.timeMs, req.crashConsistent, req.disks);
          this.ctx.log.info({ host: p.host, pointId: req.pointId, crashConsistent: req.crashConsistent, ...(discarded > 0 && { unlistedVersionsDiscarded: discarded }) }, 'point committed');
          return { pointId: req.pointId };
        });
      case 'status.report':
        this.ctx.catalog.saveHostReport(p.hostId, req);
        return {};
    }
    throw new TidemarkError('E_PROTOCOL', `unexpected message ${(req as Request).t}`);
  }

  /**
   * The envelopes of a prefix of `ids`: reading stops before the reply would pass
   * MAX_GET_REPLY_BYTES, or at a chunk that cannot be read. Only the first id's
   * failure is an error reply, so the client, asking again from the first id not
   * returned, gets each chunk's error for that chunk.
   */
  private async readChunks(vaultId: string, ids: Buffer[]): Promise<Buffer[]> {
    const envelopes: Buffer[] = [];
    let bytes = 0;
    for (const id of ids) {
      const envelope = envelopes.length === 0 ? await this.ctx.store.get(vaultId, id) : await this.ctx.store.get(vaultId, id).catch(() => null);
      if (!envelope || (envelopes.length > 0 && bytes + envelope.length > MAX_GET_REPLY_BYTES)) break;
      envelopes.push(envelope);
      bytes += envelope.length;
    }
    return envelopes;
  }

  private afterReceived<T>(work: () => T): Promise<T> {
    const done = this.received.then(work);
    this.received = done.catch(() => undefined);
    return done;
  }

  private stage(p: Extract<Principal, { role: 'agent' }>, vaultId: string, req: Extract<Request, { t: 'blocks.put' }>): { staged: number } {
    if (!this.ctx.catalog.openPointOf(p.hostId, req.pointId)) throw new TidemarkError('E_CONFLICT', `point ${req.pointId} is not open for this host`);
    const disk = this.ctx.catalog.ownDisk(p.hostId, req.diskId);
    const blockCount = Math.ceil(disk.sizeBytes / disk.blockBytes);
    const outside = req.blocks.find((b) => b >= blockCount);
    if (outside !== undefined) throw new TidemarkError('E_PROTOCOL', `block ${outside} is past the end of disk ${disk.name} (${blockCount} blocks)`);
    this.ctx.catalog.stageBlocks(vaultId, req.pointId, req.diskId, req.blocks, req.ids);
    return { staged: req.blocks.length };
  }

  private hello(p: Exclude<Principal, { role: 'enroll' }>, vaultId: string, vaultProof: Buffer): object {
    if (p.role === 'agent' && p.vaultId !== vaultId) {
      throw new TidemarkError('E_FORBIDDEN', `host ${p.host} was enrolled with another key file (vault ${p.vaultId}); use that key file`);
    }
    // Naming a vault is not enough: the caller must show it holds the vault's key.
    checkVaultProof(this.ctx.catalog, vaultId, vaultProof, p.role === 'agent' ? 'record' : 'check');
    this.vaultId = vaultId;
    return { role: p.role, host: p.role === 'agent' ? p.host : null, features: RECEIVER_FEATURES };
  }

  private readablePoint(p: Exclude<Principal, { role: 'enroll' }>, vaultId: string, pointId: number): void {
    const owner = this.ctx.catalog.pointOwner(pointId);
    const allowed = owner && owner.vaultId === vaultId && (p.role === 'restore' || owner.hostId === p.hostId);
    if (!allowed) throw new TidemarkError('E_NOT_FOUND', `no point ${pointId} that this credential may read`);
  }

  private otherHost(host: string): TidemarkError {
    return new TidemarkError('E_FORBIDDEN', `this credential may read only its own host's points, not ${host}'s; use a restore token`);
  }
}

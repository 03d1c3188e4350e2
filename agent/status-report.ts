// The agent tells the receiver how it is doing (`status.report`, SPEC §3.4), so
// that `tidemark-receiver status` shows every host's state, reason, backlog and
// throughput from the secondary zone. Best effort: a report that cannot be
// delivered never fails a sync; the receiver shows when the last one arrived.
import type { ReceiverConnection } from '../shared/connection.js';
import { MAX_REASON_CHARS } from '../shared/protocol.js';
import type { AgentState, AgentStatusRecord } from './state.js';

/** Never rejects; await it where the connection is about to close. */
export function reportStatus(conn: ReceiverConnection, state: AgentState): Promise<void> {
  const s = state.status();
  return conn.request('status.report', {
    state: s.state,
    reason: s.reason === null ? null : s.reason.slice(0, MAX_REASON_CHARS),
    tracker: s.tracker === 'tracefs' || s.tracker === 'scan' ? s.tracker : null,
    backlogBytes: Math.max(0, Math.round(s.backlogBytes ?? 0)),
    bytesPerSecond: throughput(s.progress),
  }).then(() => {}, () => {});
}

/** Bytes per second of the work under way (a scan's read rate) or of the last cycle (bytes shipped). */
function throughput(progress: AgentStatusRecord['progress']): number {
  const p = (progress ?? {}) as { bytesPerSecond?: number; bytesShipped?: number; durationMs?: number };
  if (typeof p.bytesPerSecond === 'number') return Math.max(0, Math.round(p.bytesPerSecond));
  if (typeof p.bytesShipped === 'number' && typeof p.durationMs === 'number' && p.durationMs > 0) {
    return Math.round((p.bytesShipped * 1000) / p.durationMs);
  }
  return 0;
}

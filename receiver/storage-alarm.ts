// Logging of receiver storage failures (a full disk, catalog I/O errors): once per
// failure, not once per request. A failed pack batch rejects every chunk.put of the
// batch with the same error, and an agent retrying against a full disk fails again
// every few seconds; the operator needs one line saying what is wrong and what to
// do, a reminder while it lasts, and one line when writes succeed again.
import type { TidemarkError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';

/** While storage keeps failing, at most one reminder per this interval. */
const REMIND_EVERY_MS = 60_000;

export class StorageAlarm {
  private failingSinceMs: number | null = null;
  private lastLoggedMs = 0;
  private suppressed = 0;
  private readonly seen = new WeakSet<TidemarkError>();

  constructor(
    private readonly log: Logger,
    private readonly remindEveryMs = REMIND_EVERY_MS,
  ) {}

  /** A request failed with E_STORAGE; `context` names the request. */
  failed(error: TidemarkError, context: Record<string, unknown>): void {
    if (this.seen.has(error)) return; // the same failure, reported to another request of the batch
    this.seen.add(error);
    const now = Date.now();
    if (this.failingSinceMs !== null && now - this.lastLoggedMs < this.remindEveryMs) {
      this.suppressed++;
      return;
    }
    const first = this.failingSinceMs === null;
    this.failingSinceMs ??= now;
    this.log.error(
      { code: error.code, reason: error.message, ...context, failingForSeconds: Math.round((now - this.failingSinceMs) / 1000), failuresNotLogged: this.suppressed },
      first ? 'receiver storage failing: writes are refused until it is fixed' : 'receiver storage still failing',
    );
    this.lastLoggedMs = now;
    this.suppressed = 0;
  }

  /**
   * A point was committed: replication got through. (Single chunks stored in the space a
   * failed batch gave back are no sign of recovery; the alarm would flap.)
   */
  succeeded(): void {
    if (this.failingSinceMs === null) return;
    this.log.info({ failingForSeconds: Math.round((Date.now() - this.failingSinceMs) / 1000), failuresNotLogged: this.suppressed }, 'receiver storage writable again');
    this.failingSinceMs = null;
    this.suppressed = 0;
  }
}

const alarms = new WeakMap<Logger, StorageAlarm>();

/** The alarm of a receiver process (one per logger: sessions share it). */
export function storageAlarm(log: Logger): StorageAlarm {
  let alarm = alarms.get(log);
  if (!alarm) alarms.set(log, (alarm = new StorageAlarm(log)));
  return alarm;
}

// Leftovers (a partial export, a drill's scratch directory) must go on every
// path out, also when the user interrupts: a signal handler that cleans up
// and then lets the signal end the process as it would have.
const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

/** Runs `body`; if a signal arrives meanwhile, runs `cleanup` (synchronous) and dies of that signal. */
export async function withSignalCleanup<T>(cleanup: () => void, body: () => Promise<T>): Promise<T> {
  const onSignal = (signal: NodeJS.Signals) => {
    removeHandlers();
    try {
      cleanup();
    } finally {
      process.kill(process.pid, signal);
    }
  };
  const removeHandlers = () => {
    for (const signal of SIGNALS) process.off(signal, onSignal);
  };
  for (const signal of SIGNALS) process.on(signal, onSignal);
  try {
    return await body();
  } finally {
    removeHandlers();
  }
}

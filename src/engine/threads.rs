//! The threads of sessions: their names, their CPU time, and the shared compute pool.
//!
//! candle (and gemm under it) parallelises its kernels on rayon's global pool. An unnamed
//! thread inherits the name of the thread that creates it, so without [`name_compute_pool`]
//! the pool's threads, started by the first session thread to compute, would carry that
//! session thread's name for the life of the process and be taken for a session's threads
//! that outlived their call.

use std::collections::BTreeMap;
use std::sync::Once;
use std::time::Duration;

/// Name prefixes of a session's threads, for [`threads_cpu`].
pub const SESSION_THREADS: [&str; 2] = ["session-", "pacer"];

/// Name prefix of the compute pool's threads (shared by every session, never ended).
pub const COMPUTE_THREADS: &str = "compute-";

/// Starts rayon's global pool (candle's compute threads) with threads named `compute-N`,
/// once per process; a no-op if the pool was already started (by this or by anyone else).
pub fn name_compute_pool() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("{COMPUTE_THREADS}{i}"))
            .build_global()
        {
            tracing::debug!("the compute pool was started before the first session: {e}");
        }
    });
}

/// Settles candle's CPU threading from the environment, or these defaults, before the first
/// model op:
///
/// - `RAYON_NUM_THREADS`: candle asks for the thread count on every op, and without the
///   variable it counts the physical cores by reading `/proc/cpuinfo` each time (5 % of a busy
///   server's CPU); it is set to the CPUs this process may use (rayon's own default).
/// - `CANDLE_NUM_THREADS`, with `many_sessions`: candle's element-wise ops run on one
///   process-wide pool behind a single lock, whose callers spin until its workers are done.
///   With a session thread busy on every core that spinning took a third of the server's CPU;
///   one thread runs those ops inline on the session's own thread (the products keep the
///   compute pool).
///
/// # Safety
/// It sets environment variables: call it before any other thread starts.
pub unsafe fn settle_compute_threads(many_sessions: bool) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cpus.to_string()) };
    }
    if many_sessions && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// Held by each thread of a session; when the last one ends, the memory the session freed
/// is handed back to the system.
///
/// An allocator keeps freed pages for reuse (glibc raises its mmap threshold to the largest
/// block freed so far, up to 32 MiB; jemalloc purges only as it allocates, after a decay), so
/// after a call ends a session's KV caches and activations stay memory the server holds;
/// without this its RSS grows with every busiest moment and does not come back on an idle
/// server. Purging returns the free pages (a few milliseconds, once per call).
#[derive(Debug)]
pub struct ReleaseMemoryOnExit;

impl Drop for ReleaseMemoryOnExit {
    fn drop(&mut self) {
        return_freed_memory();
    }
}

/// Hands the allocators' free pages back to the system: jemalloc's (the binary's global
/// allocator: every arena's dirty and muzzy pages) and glibc's (the C libraries' codecs and, in
/// the library's own tests, everything).
fn return_freed_memory() {
    // SAFETY: "arena.<MALLCTL_ARENAS_ALL>.purge" takes and returns nothing (null pointers, zero
    // length) and only releases jemalloc's own unused pages.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time the calling thread has run (Linux: `/proc/thread-self/schedstat`).
pub fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// CPU time run so far by the threads of this process whose name starts with one of
/// `prefixes` (Linux: `/proc/self/task/*/schedstat`), summed by name.
pub fn threads_cpu(prefixes: &[&str]) -> Option<BTreeMap<String, Duration>> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let name = name.trim_end();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("schedstat"))
            && let Some(ns) = text.split_whitespace().next().and_then(|v| v.parse().ok())
        {
            *out.entry(name.to_string()).or_default() += Duration::from_nanos(ns);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_threads_never_carry_a_session_threads_name() {
        let from_session = std::thread::Builder::new()
            .name("session-thinker".into())
            .spawn(|| {
                name_compute_pool();
                // the pool's threads start now, from a session-named thread
                rayon::broadcast(|_| std::thread::current().name().map(String::from))
            })
            .unwrap()
            .join()
            .unwrap();
        // (another test of this binary may have started the pool first, under its own name)
        for name in from_session.into_iter().flatten() {
            assert!(
                !SESSION_THREADS.iter().any(|p| name.starts_with(p)),
                "{name}"
            );
        }
    }

    #[test]
    fn the_calling_threads_cpu_time_is_counted_under_its_name() {
        // (a thread's name as the kernel keeps it is at most 15 bytes)
        let busy = std::thread::Builder::new()
            .name("session-cpu".into())
            .spawn(|| {
                let start = thread_cpu().expect("schedstat");
                let mut x = 0u64;
                while thread_cpu().unwrap() - start < Duration::from_millis(5) {
                    x = x.wrapping_add(1);
                }
                let all = threads_cpu(&["session-cpu"]).unwrap();
                (x, all["session-cpu"])
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(busy.1 >= Duration::from_millis(5), "{busy:?}");
    }
}

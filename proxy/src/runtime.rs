//! The tokio runtime the proxy runs on, sized by `workers`.
//!
//! One worker gets tokio's current-thread scheduler: every task runs on
//! the thread that polls the sockets, with no run queues shared between
//! threads. Measured on a proxy pinned to one CPU (`bench/`), it serves
//! about 10 % more requests per CPU second than the multi-threaded
//! scheduler with one worker, and wakes the callers' CPU about half as
//! often per request (each wakeup of another CPU is an interrupt the
//! sender pays for). More workers get the multi-threaded scheduler, whose
//! work stealing spreads connections over them.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A runtime with `workers` threads serving requests (at least one).
pub fn build(workers: usize) -> io::Result<Runtime> {
    let mut builder = if workers <= 1 {
        Builder::new_current_thread()
    } else {
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder
        .enable_all()
        .thread_name("mesh-proxy-worker")
        .build()
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::*;

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        let rt = build(1).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        // Timers and sockets work on it.
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (connected, accepted) = tokio::join!(
                tokio::net::TcpStream::connect(addr),
                tokio::time::timeout(std::time::Duration::from_secs(5), listener.accept()),
            );
            connected.unwrap();
            accepted.unwrap().unwrap();
        });
    }

    #[test]
    fn more_workers_are_the_multi_thread_scheduler() {
        let rt = build(3).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}

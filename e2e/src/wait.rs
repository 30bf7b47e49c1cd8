//! Assertions that poll until a deadline instead of sleeping a fixed time.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

/// How often [`eventually`] tries again.
pub const POLL: Duration = Duration::from_millis(50);

/// Runs `attempt` until it returns `Ok` or `deadline` has passed; the error
/// then names `what` and carries the last attempt's error.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    eventually_every(what, deadline, POLL, attempt).await
}

/// [`eventually`] with a chosen poll interval (short for timing measurements).
pub async fn eventually_every<T, F, Fut>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let last = match tokio::time::timeout(deadline, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e,
            Err(_) => anyhow!("one attempt took longer than the whole deadline"),
        };
        if start.elapsed() >= deadline {
            return Err(last.context(format!(
                "{what}: not true after {deadline:?} ({tries} tries); last attempt"
            )));
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_success() {
        let mut n = 0;
        let got = eventually("third try", Duration::from_secs(5), || {
            n += 1;
            let now = n;
            async move {
                if now < 3 {
                    Err(anyhow!("try {now}"))
                } else {
                    Ok(now)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn eventually_fails_with_the_last_error_after_the_deadline() {
        let err = eventually("never", Duration::from_millis(120), || async {
            Err::<(), _>(anyhow!("still no"))
        })
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("never") && text.contains("still no"),
            "{text}"
        );
    }
}

//! Accept failures, logged at a bounded rate.
//!
//! When the process runs out of file descriptors (EMFILE, ENFILE) every accept fails
//! at once and keeps failing until a connection closes: one line per failure would
//! flood the log exactly when someone needs to read it. One line a second, with the
//! count of the failures it stands for, says the same.

use std::io;
use std::time::Duration;
use tokio::time::Instant;

/// How often an accept failure is logged at most.
const EVERY: Duration = Duration::from_secs(1);

/// How long the accept loop waits after a failure: the cause (no free descriptor)
/// repeats at once, so retrying immediately would only spin.
pub const BACKOFF: Duration = Duration::from_millis(50);

/// The failures of one listener since its last log line.
#[derive(Debug, Default)]
pub struct AcceptErrors {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// Notes a failure; logs it unless one was logged less than a second ago.
    pub fn note(&mut self, listener: &'static str, error: &io::Error) {
        if let Some(suppressed) = self.should_log(Instant::now()) {
            let hint = if is_fd_exhaustion(error) {
                "out of file descriptors: raise the open-files limit (ulimit -n, LimitNOFILE) or lower http.max_connections"
            } else {
                "retrying"
            };
            tracing::warn!(listener, error = %error, suppressed, "accept failed; {hint}");
        }
    }

    /// `Some(failures not logged since the last line)` when this one should be logged.
    fn should_log(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(at) if now.duration_since(at) < EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(unix)]
fn is_fd_exhaustion(error: &io::Error) -> bool {
    // The process's limit and the system's.
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(not(unix))]
fn is_fd_exhaustion(_: &io::Error) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_carries_the_count_of_the_rest() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        assert_eq!(errors.should_log(start), Some(0));
        for ms in 1..=999 {
            assert_eq!(errors.should_log(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(errors.should_log(start + EVERY), Some(999));
        assert_eq!(errors.should_log(start + EVERY * 3), Some(0));
    }
}

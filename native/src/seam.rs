//! The seam to the control plane (Python): an intercepted call's one request goes to the
//! pipeline, which answers with what to send upstream (or a status); its response comes back to
//! the pipeline as an observation.
//!
//! Notes:
//! - No thread of the data plane ever takes the GIL. A job goes into a channel, and the asyncio
//!   loop's own thread is woken by a doorbell: one byte on a socket pair the loop watches
//!   (`loop.add_reader`), rung only when the loop is not already due to look (so a burst of calls
//!   costs one wake-up). The loop then takes every job waiting (`DataPlane.take_jobs`) with the
//!   GIL it already holds. The pipeline's answer comes back on a oneshot channel, which the Python
//!   side completes without waiting on anything.
//! - A call the pipeline does not answer within the caller's deadline (or CONTROL_TIMEOUT when
//!   the caller set none) ends DEADLINE_EXCEEDED; a control plane that is gone fails intercepted
//!   calls closed (UNAVAILABLE). Passthrough calls never come here.
//! - Every call handed over is closed on the Python side exactly once: `Done` after the runtime
//!   answered, or `Forget` when the call ended otherwise (denied, timed out, cancelled).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::status::{self, Status};

/// How long an intercepted call without a deadline waits for the pipeline's answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send these message bytes upstream (None: the caller's own, unchanged).
    Forward(Option<Vec<u8>>),
    /// End the call with this status; nothing goes upstream.
    Fail(Status),
}

pub struct Ask {
    pub id: u64,
    pub method: String,
    pub path: String,
    pub metadata: Vec<(String, String)>,
    pub message: Bytes,
    pub deadline: Option<Duration>,
    /// The call's (trace id, span id) when it is sampled: the pipeline's notes go on that span.
    pub span: Option<([u8; 16], [u8; 8])>,
    pub reply: oneshot::Sender<Verdict>,
}

pub enum Job {
    Ask(Ask),
    /// The runtime answered an intercepted call: its status code and, when OK, its message.
    Done {
        id: u64,
        code: u8,
        response: Option<Bytes>,
    },
    /// The call ended without reaching the runtime's answer.
    Forget {
        id: u64,
    },
}

/// Wakes the control plane's loop when a job waits for it (see the module notes).
pub struct Doorbell {
    /// True from the ring until the loop starts taking jobs: nobody needs to ring meanwhile.
    pub armed: Arc<AtomicBool>,
    bell: UnixStream,
}

impl Doorbell {
    /// `bell` is the data plane's end of a non-blocking socket pair; the loop watches the other.
    pub fn new(bell: UnixStream, armed: Arc<AtomicBool>) -> Self {
        Doorbell { armed, bell }
    }

    fn ring(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            // A full socket buffer already holds a ring: nothing is lost by not writing.
            let _ = (&self.bell).write(&[1]);
        }
    }
}

pub struct Control {
    jobs: mpsc::Sender<Job>,
    next: AtomicU64,
    doorbell: Option<Doorbell>,
}

impl Control {
    pub fn new(jobs: mpsc::Sender<Job>, doorbell: Option<Doorbell>) -> Self {
        Control {
            jobs,
            next: AtomicU64::new(1),
            doorbell,
        }
    }

    /// Queue `job` for the control plane and wake it; false when it is gone.
    fn send(&self, job: Job) -> bool {
        if self.jobs.send(job).is_err() {
            return false;
        }
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring();
        }
        true
    }

    /// Hand a call to the pipeline and wait for its verdict (see the module notes).
    pub async fn ask(
        &self,
        method: String,
        path: String,
        metadata: Vec<(String, String)>,
        message: Bytes,
        deadline: Option<Duration>,
        span: Option<([u8; 16], [u8; 8])>,
    ) -> (Verdict, Handed<'_>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let handed = Handed {
            control: self,
            id,
            closed: false,
        };
        let job = Job::Ask(Ask {
            id,
            method,
            path,
            metadata,
            message,
            deadline,
            span,
            reply,
        });
        if !self.send(job) {
            let st = Status::new(
                status::UNAVAILABLE,
                "criproxy: the control plane is not running; intercepted calls fail closed",
            );
            return (
                Verdict::Fail(st),
                Handed {
                    closed: true,
                    ..handed
                },
            );
        }
        let wait = deadline.unwrap_or(CONTROL_TIMEOUT);
        let verdict = match tokio::time::timeout(wait, answer).await {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(_)) => Verdict::Fail(Status::new(
                status::INTERNAL,
                "criproxy: the control plane dropped the call without an answer; it was not forwarded",
            )),
            Err(_) => Verdict::Fail(Status::new(
                status::DEADLINE_EXCEEDED,
                format!(
                    "criproxy: the policy pipeline did not answer within {:.3} s ({}); the call was not forwarded",
                    wait.as_secs_f64(),
                    if deadline.is_some() { "the caller's deadline" } else { "the proxy's limit" }
                ),
            )),
        };
        (verdict, handed)
    }
}

/// A call on the Python side's books until closed (dropping it forgets the call).
pub struct Handed<'a> {
    control: &'a Control,
    id: u64,
    closed: bool,
}

impl Handed<'_> {
    pub fn done(mut self, code: u8, response: Option<Bytes>) {
        self.closed = true;
        self.control.send(Job::Done {
            id: self.id,
            code,
            response,
        });
    }
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        if !self.closed {
            self.control.send(Job::Forget { id: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty call to method "M", with this deadline.
    async fn ask_empty(control: &Control, deadline: Option<Duration>) -> (Verdict, Handed<'_>) {
        control
            .ask(
                "M".into(),
                "/p".into(),
                vec![],
                Bytes::new(),
                deadline,
                None,
            )
            .await
    }

    #[tokio::test]
    async fn an_answer_comes_back_and_the_call_is_closed_once() {
        let (tx, rx) = mpsc::channel();
        let control = Control::new(tx, None);
        let python = std::thread::spawn(move || {
            let Job::Ask(ask) = rx.recv().unwrap() else {
                panic!("not an ask")
            };
            assert_eq!(
                (ask.method.as_str(), &ask.message[..]),
                ("RuntimeService/CreateContainer", &b"req"[..])
            );
            ask.reply
                .send(Verdict::Forward(Some(b"changed".to_vec())))
                .unwrap();
            match rx.recv().unwrap() {
                Job::Done { id, code, response } => assert_eq!(
                    (id, code, response),
                    (ask.id, 0, Some(Bytes::from_static(b"resp")))
                ),
                _ => panic!("expected Done"),
            }
            assert!(rx.recv().is_err(), "nothing after Done");
        });
        let (verdict, handed) = control
            .ask(
                "RuntimeService/CreateContainer".into(),
                "/p".into(),
                vec![],
                Bytes::from_static(b"req"),
                None,
                None,
            )
            .await;
        assert_eq!(verdict, Verdict::Forward(Some(b"changed".to_vec())));
        handed.done(0, Some(Bytes::from_static(b"resp")));
        drop(control);
        python.join().unwrap();
    }

    #[tokio::test]
    async fn no_answer_within_the_deadline_is_deadline_exceeded_and_forgotten() {
        let (tx, rx) = mpsc::channel();
        let control = Control::new(tx, None);
        let (verdict, handed) = ask_empty(&control, Some(Duration::from_millis(20))).await;
        let Verdict::Fail(st) = verdict else {
            panic!("expected a failure")
        };
        assert_eq!(st.code, status::DEADLINE_EXCEEDED);
        assert!(
            st.message.contains("the caller's deadline"),
            "{}",
            st.message
        );
        drop(handed);
        let jobs: Vec<Job> = rx.try_iter().collect();
        assert!(matches!(jobs.as_slice(), [Job::Ask(_), Job::Forget { .. }]));
    }

    #[tokio::test]
    async fn a_dropped_answer_fails_closed() {
        let (tx, rx) = mpsc::channel();
        let control = Control::new(tx, None);
        let python = std::thread::spawn(move || {
            let Job::Ask(ask) = rx.recv().unwrap() else {
                panic!()
            };
            drop(ask.reply);
        });
        let (verdict, _handed) = ask_empty(&control, None).await;
        python.join().unwrap();
        assert!(matches!(
            verdict,
            Verdict::Fail(Status {
                code: status::INTERNAL,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_control_plane_that_is_gone_fails_closed_at_once() {
        let (tx, rx) = mpsc::channel();
        drop(rx);
        let control = Control::new(tx, None);
        let (verdict, _) = ask_empty(&control, None).await;
        assert!(matches!(
            verdict,
            Verdict::Fail(Status {
                code: status::UNAVAILABLE,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_burst_of_jobs_rings_the_doorbell_once_until_the_loop_looks() {
        let (tx, rx) = mpsc::channel();
        let (bell, mut watched) = UnixStream::pair().unwrap();
        bell.set_nonblocking(true).unwrap();
        watched.set_nonblocking(true).unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let control = Control::new(tx, Some(Doorbell::new(bell, armed.clone())));
        for _ in 0..3 {
            let (_, handed) = ask_empty(&control, Some(Duration::from_millis(1))).await;
            drop(handed);
        }
        let mut rung = [0u8; 16];
        use std::io::Read;
        assert_eq!(watched.read(&mut rung).unwrap(), 1, "one ring for six jobs");
        assert_eq!(rx.try_iter().count(), 6, "three asks, three forgets");
        armed.store(false, Ordering::Release); // the loop looked
        let (_, handed) = ask_empty(&control, Some(Duration::from_millis(1))).await;
        drop(handed);
        assert_eq!(
            watched.read(&mut rung).unwrap(),
            1,
            "a new job after the loop looked rings again"
        );
    }
}

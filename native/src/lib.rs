//! criproxy's data plane: a tokio + hyper HTTP/2 relay that carries every CRI call between the
//! kubelet's socket and the runtime's, driven from Python (the `criproxy._native` module).
//!
//! The Python side (criproxy/transport/plane.py) is the program: it binds nothing itself, but
//! tells this module where to listen, where the runtime is, which APIs the runtime speaks and
//! which methods its pipeline intercepts; it reads the counters at scrape time. Calls no
//! interceptor claims never take the GIL (see seam.rs for the ones that do).
//!
//! Layout: `server` (accept, route, serve), `upstream` (the runtime connection), `sock` and
//! `acks` (its socket, and the order of PING acknowledgements on it), `body` (the bytes in
//! flight), `frame` (gRPC message boundaries), `routes`, `seam`, `metrics`, `track`, `status`,
//! `authority` (clients whose :authority h2 would refuse). This file is the PyO3 glue.

pub mod acks;
pub mod authority;
pub mod body;
pub mod frame;
pub mod metrics;
pub mod routes;
pub mod seam;
pub mod server;
pub mod sock;
pub mod status;
pub mod trace;
pub mod track;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use tokio::sync::{oneshot, watch};

use crate::routes::{Apis, Methods, Table};
use crate::seam::{Control, Job, Verdict};
use crate::server::Shared;
use crate::status::Status;
use crate::upstream::Upstream;

/// One intercepted call, as the pipeline sees it; answered once with `forward` or `fail`.
#[pyclass(module = "criproxy._native")]
struct InterceptedCall {
    #[pyo3(get)]
    method: String,
    #[pyo3(get)]
    path: String,
    #[pyo3(get)]
    metadata: Vec<(String, String)>,
    #[pyo3(get)]
    message: Py<PyBytes>,
    #[pyo3(get)]
    deadline: Option<f64>,
    /// (trace id, span id) of the proxy's span when the call is sampled, else None.
    #[pyo3(get)]
    span: Option<(Py<PyBytes>, Py<PyBytes>)>,
    /// Free for the Python side: what it keeps between the call and its response.
    #[pyo3(get, set)]
    state: Py<PyAny>,
    reply: Mutex<Option<oneshot::Sender<Verdict>>>,
}

impl InterceptedCall {
    fn answer(&self, verdict: Verdict) -> bool {
        match self.reply.lock().expect("reply lock").take() {
            Some(reply) => reply.send(verdict).is_ok(),
            None => false,
        }
    }
}

#[pymethods]
impl InterceptedCall {
    /// Send `message` upstream (None: the caller's own bytes). False if the call was already
    /// answered or is gone (it timed out, or the caller left).
    #[pyo3(signature = (message=None))]
    fn forward(&self, message: Option<&Bound<'_, PyBytes>>) -> bool {
        // One copy out of the bytes object (extracting a Vec<u8> would go element by element).
        self.answer(Verdict::Forward(message.map(|m| m.as_bytes().to_vec())))
    }

    /// End the call with gRPC status `code` and `message`; nothing goes upstream.
    fn fail(&self, code: u8, message: String) -> PyResult<bool> {
        if code == 0 || usize::from(code) >= status::CODES {
            return Err(PyValueError::new_err(format!(
                "fail: {code} is not a gRPC error code (1 to 16)"
            )));
        }
        Ok(self.answer(Verdict::Fail(Status::new(code, message))))
    }

    fn __repr__(&self) -> String {
        format!("<InterceptedCall {}>", self.path)
    }
}

/// The data plane's thread, and how to stop it.
struct Running {
    stop: watch::Sender<bool>,
    /// How long stop lets connections drain; set before `stop` is sent.
    grace: Arc<Mutex<Duration>>,
    /// Ends with true when every connection finished within the grace.
    thread: std::thread::JoinHandle<bool>,
}

/// The data plane's one thread: a current-thread tokio runtime serving until stop, then
/// draining for the grace period (see `DataPlane.start`).
fn run_plane(
    shared: Arc<Shared>,
    listen_path: PathBuf,
    mut stopped: watch::Receiver<bool>,
    grace: Arc<Mutex<Duration>>,
    ready: mpsc::Sender<std::io::Result<()>>,
) -> bool {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return true;
        }
    };
    let drained = runtime.block_on(async move {
        let listener = match tokio::net::UnixListener::bind(&listen_path) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(e));
                return true;
            }
        };
        let mut upstreams = vec![shared.runtime.clone()];
        if !Arc::ptr_eq(&shared.runtime, &shared.image) {
            upstreams.push(shared.image.clone());
        }
        let mut first = Vec::new();
        for upstream in upstreams {
            let (tx, rx) = oneshot::channel();
            tokio::spawn(upstream.maintain(stopped.clone(), tx));
            first.push(rx);
        }
        for rx in first {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
        let _ = ready.send(Ok(()));
        tokio::spawn(server::serve(listener, shared.clone(), stopped.clone()));
        while !*stopped.borrow() {
            if stopped.changed().await.is_err() {
                break;
            }
        }
        let grace = *grace.lock().expect("grace lock");
        tokio::time::timeout(grace, shared.live.drained())
            .await
            .is_ok()
    });
    // Whatever is still running (connections past the grace, the upstream tasks) ends here.
    runtime.shutdown_timeout(Duration::from_millis(100));
    drained
}

/// The data plane of one proxy (see the module docs).
#[pyclass(module = "criproxy._native", frozen)]
struct DataPlane {
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
    seam: Mutex<Option<SeamState>>,
}

fn upstream_path(endpoint: &str) -> PyResult<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(PyValueError::new_err(format!(
            "endpoint {endpoint:?}: expected unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(path))
}

#[pymethods]
impl DataPlane {
    #[new]
    #[pyo3(signature = (*, runtime_endpoint, image_endpoint, methods, max_message_bytes, max_concurrent_calls, connection_age_seconds))]
    fn new(
        runtime_endpoint: String,
        image_endpoint: String,
        methods: Vec<(String, bool)>,
        max_message_bytes: usize,
        max_concurrent_calls: usize,
        connection_age_seconds: f64,
    ) -> PyResult<Self> {
        if connection_age_seconds.is_nan() || connection_age_seconds <= 0.0 {
            return Err(PyValueError::new_err(
                "connection_age_seconds must be positive",
            ));
        }
        let runtime = Upstream::new(
            runtime_endpoint.clone(),
            upstream_path(&runtime_endpoint)?,
            "runtime",
        );
        let image = if image_endpoint == runtime_endpoint {
            runtime.clone()
        } else {
            Upstream::new(
                image_endpoint.clone(),
                upstream_path(&image_endpoint)?,
                "image",
            )
        };
        let shared = server::new_shared(
            Methods::new(methods),
            runtime,
            image,
            max_message_bytes,
            max_concurrent_calls,
            Duration::from_secs_f64(connection_age_seconds),
        );
        Ok(DataPlane {
            shared,
            running: Mutex::new(None),
            seam: Mutex::new(None),
        })
    }

    /// Bind `listen_path` and start serving; returns once the runtime was dialled once (whether
    /// or not it answered). OSError when the path cannot be bound.
    fn start(&self, py: Python<'_>, listen_path: PathBuf) -> PyResult<()> {
        let mut running = self.running.lock().expect("plane lock");
        if running.is_some() {
            return Err(PyRuntimeError::new_err("the data plane is already running"));
        }
        let shared = self.shared.clone();
        let (stop, stopped) = watch::channel(false);
        let grace = Arc::new(Mutex::new(Duration::ZERO));
        let (ready, started) = mpsc::channel();
        let plane_grace = grace.clone();
        let thread = std::thread::Builder::new()
            .name("criproxy-data".into())
            .spawn(move || run_plane(shared, listen_path, stopped, plane_grace, ready))
            .map_err(|e| {
                PyOSError::new_err(format!("cannot start the data plane's thread: {e}"))
            })?;
        match py.detach(move || started.recv()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(PyOSError::new_err(format!("cannot serve: {e}")));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(PyRuntimeError::new_err(
                    "the data plane's thread ended before it served",
                ));
            }
        }
        let started = Running {
            stop,
            grace,
            thread,
        };
        *running = Some(started);
        Ok(())
    }

    /// Replace the route table: the APIs each upstream speaks, and the intercepted method keys.
    fn set_routes(
        &self,
        runtime_apis: Vec<String>,
        image_apis: Vec<String>,
        intercepted: Vec<String>,
    ) {
        let table = Table {
            runtime_apis: Apis::new(&runtime_apis),
            image_apis: Apis::new(&image_apis),
            intercepted: intercepted.into_iter().collect::<HashSet<_>>(),
        };
        *self.shared.table.write().expect("route table lock") = Arc::new(table);
    }

    /// Hand intercepted calls to the control plane: returns the file descriptor its event loop
    /// watches (`loop.add_reader(fd, ...)`); when it is readable, `take_jobs` has work.
    fn set_control(&self) -> PyResult<i32> {
        let mut seam = self.seam.lock().expect("seam lock");
        if seam.is_some() {
            return Err(PyRuntimeError::new_err("the control plane is already set"));
        }
        let (bell, watched) = std::os::unix::net::UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(|e| PyOSError::new_err(format!("cannot make the seam's doorbell: {e}")))?;
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (jobs, inbox) = mpsc::channel();
        let doorbell = seam::Doorbell::new(bell, armed.clone());
        *self.shared.control.write().expect("control lock") =
            Some(Arc::new(Control::new(jobs, Some(doorbell))));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&watched);
        *seam = Some(SeamState {
            inbox,
            open: HashMap::new(),
            watched,
            armed,
        });
        Ok(fd)
    }

    /// The jobs waiting for the control plane, oldest first: (0, call, 0, None) for a call to
    /// decide, (1, call, code, response) for the runtime's answer to one (response: the message
    /// when code is 0). Call it from the loop when the fd of `set_control` is readable.
    fn take_jobs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut guard = self.seam.lock().expect("seam lock");
        let Some(seam) = guard.as_mut() else {
            return Ok(out);
        };
        // Empty the doorbell, then disarm it, then take the jobs: a job sent after the disarm
        // rings again, so none is left waiting without a wake-up.
        let mut rung = [0u8; 256];
        while let Ok(n) = std::io::Read::read(&mut &seam.watched, &mut rung) {
            if n == 0 {
                break;
            }
        }
        seam.armed
            .store(false, std::sync::atomic::Ordering::Release);
        for job in seam.inbox.try_iter() {
            match job {
                Job::Ask(ask) => {
                    let call = Py::new(
                        py,
                        InterceptedCall {
                            method: ask.method,
                            path: ask.path,
                            metadata: ask.metadata,
                            message: PyBytes::new(py, &ask.message).unbind(),
                            deadline: ask.deadline.map(|d| d.as_secs_f64()),
                            span: ask.span.map(|(t, s)| {
                                (PyBytes::new(py, &t).unbind(), PyBytes::new(py, &s).unbind())
                            }),
                            state: py.None(),
                            reply: Mutex::new(Some(ask.reply)),
                        },
                    )?;
                    out.append((0u8, call.clone_ref(py), 0u8, py.None()))?;
                    seam.open.insert(ask.id, call);
                }
                Job::Done { id, code, response } => {
                    if let Some(call) = seam.open.remove(&id) {
                        let response = match response {
                            Some(r) => PyBytes::new(py, &r).into_any().unbind(),
                            None => py.None(),
                        };
                        out.append((1u8, call, code, response))?;
                    }
                }
                Job::Forget { id } => {
                    seam.open.remove(&id);
                }
            }
        }
        Ok(out)
    }

    /// Trace sampled calls (OTEL_TRACES_SAMPLER's `sampler` and `ratio`); finished spans wait
    /// for `take_spans`, at most `queue` of them (more are dropped and counted).
    #[pyo3(signature = (sampler, ratio=1.0, queue=4096))]
    fn set_tracing(&self, sampler: &str, ratio: f64, queue: usize) -> PyResult<()> {
        let parsed = trace::Sampler::parse(sampler, ratio).ok_or_else(|| {
            PyValueError::new_err(format!(
                "OTEL_TRACES_SAMPLER={sampler:?} is not a sampler criproxy knows"
            ))
        })?;
        *self.shared.tracer.write().expect("tracer lock") =
            Some(Arc::new(trace::Tracer::new(parsed, queue.max(1))));
        Ok(())
    }

    /// Finished spans, waiting up to `timeout_seconds` for the first: a list of (trace id, span
    /// id, parent span id or None, path, start ns, end ns, status code); None once stopped and
    /// every span was taken.
    fn take_spans<'py>(
        &self,
        py: Python<'py>,
        timeout_seconds: f64,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let Some(tracer) = self.shared.tracer.read().expect("tracer lock").clone() else {
            return Ok(None);
        };
        let stopped = self
            .shared
            .stopped
            .load(std::sync::atomic::Ordering::Relaxed);
        let wait = Duration::from_secs_f64(timeout_seconds.max(0.0));
        let records = py.detach(|| {
            let inbox = tracer.inbox.lock().expect("span inbox lock");
            let mut got: Vec<trace::Record> = if stopped {
                Vec::new()
            } else {
                inbox.recv_timeout(wait).into_iter().collect()
            };
            got.extend(inbox.try_iter().take(4096));
            got
        });
        if stopped && records.is_empty() {
            return Ok(None);
        }
        let out = PyList::empty(py);
        for r in records {
            let parent = r.span.parent.map(|p| PyBytes::new(py, &p));
            out.append((
                PyBytes::new(py, &r.span.trace_id),
                PyBytes::new(py, &r.span.span_id),
                parent,
                r.path,
                r.span.start_ns,
                r.end_ns,
                r.code,
            ))?;
        }
        Ok(Some(out))
    }

    /// Finished spans dropped because the exporter fell behind.
    fn spans_dropped(&self) -> u64 {
        self.shared
            .tracer
            .read()
            .expect("tracer lock")
            .as_ref()
            .map_or(0, |t| t.dropped.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// True while the upstream of `role` ("runtime" or "image") is connected.
    fn is_connected(&self, role: &str) -> bool {
        if role == "image" {
            &self.shared.image
        } else {
            &self.shared.runtime
        }
        .is_connected()
    }

    /// Calls being served now (streams included).
    fn in_flight(&self) -> usize {
        self.shared
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections being served now.
    fn connections(&self) -> usize {
        self.shared.live.count()
    }

    /// Stop: no new connections, every connection asked to finish (GOAWAY); wait up to
    /// `grace_seconds` for them, then end the rest. True when all finished in time.
    fn stop(&self, py: Python<'_>, grace_seconds: f64) -> bool {
        let Some(running) = self.running.lock().expect("plane lock").take() else {
            return true;
        };
        *self.shared.control.write().expect("control lock") = None;
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let drained = py.detach(move || {
            *running.grace.lock().expect("grace lock") =
                Duration::from_secs_f64(grace_seconds.max(0.0));
            let _ = running.stop.send(true);
            running.thread.join().unwrap_or(false)
        });
        // The calls still open end with the plane; their Python objects go with the GIL held.
        drop(self.seam.lock().expect("seam lock").take());
        drained
    }

    /// The counters, for the metrics endpoint: see criproxy/metrics/native.py.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.shared.metrics.snapshot();
        let methods = &self.shared.methods;
        let out = PyDict::new(py);
        let calls = PyList::empty(py);
        for (m, code, n, duration) in &s.calls {
            calls.append((
                methods.key(*m),
                status::NAMES[usize::from(*code)],
                n,
                duration.cumulative.clone(),
                duration.sum_seconds,
            ))?;
        }
        out.set_item("calls", calls)?;
        let per_method = PyList::empty(py);
        for (m, ms) in s.per_method.iter().enumerate() {
            per_method.append((
                methods.key(m),
                ms.in_flight,
                (ms.runtime.cumulative.clone(), ms.runtime.sum_seconds),
                (ms.proxy.cumulative.clone(), ms.proxy.sum_seconds),
                ms.streams,
                ms.stream_messages,
            ))?;
        }
        out.set_item("methods", per_method)?;
        out.set_item("buckets", metrics::BUCKETS.to_vec())?;
        let reconnects = PyDict::new(py);
        reconnects.set_item(
            "runtime",
            self.shared
                .runtime
                .reconnects
                .load(std::sync::atomic::Ordering::Relaxed),
        )?;
        if !Arc::ptr_eq(&self.shared.runtime, &self.shared.image) {
            reconnects.set_item(
                "image",
                self.shared
                    .image
                    .reconnects
                    .load(std::sync::atomic::Ordering::Relaxed),
            )?;
        }
        out.set_item("reconnects", reconnects)?;
        Ok(out)
    }
}

/// The control plane's side of the seam: its inbox, the calls it was handed and not yet told
/// the end of, and the doorbell it watches. Used only with the GIL held (from the loop).
struct SeamState {
    inbox: mpsc::Receiver<Job>,
    open: HashMap<u64, Py<InterceptedCall>>,
    watched: std::os::unix::net::UnixStream,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataPlane>()?;
    m.add_class::<InterceptedCall>()?;
    m.add("BUCKETS", metrics::BUCKETS.to_vec())?;
    m.add(
        "RECONNECT_MAX_SECONDS",
        upstream::RECONNECT_MAX.as_secs_f64(),
    )?;
    m.add(
        "CONTROL_TIMEOUT_SECONDS",
        seam::CONTROL_TIMEOUT.as_secs_f64(),
    )?;
    Ok(())
}

//! Where a call goes: its method (for metrics and interception), its upstream, and the path the
//! upstream is asked for.
//!
//! Notes:
//! - A CRI path is /runtime.<api>.<Service>/<Method>. v1 and v1alpha2 carry the same messages on
//!   the wire, so a call moves between the two APIs by renaming the package in its path alone.
//!   A caller is served in its own API when the runtime speaks it, else in the one it does.
//! - Which APIs the runtime speaks, and which methods the pipeline intercepts, are told by the
//!   Python side (which asks the runtime with Version at start and after every reconnect) and
//!   swapped whole; each call reads one version of them.
//! - A path outside the CRI table (a newer CRI method, another service on the runtime's socket)
//!   is forwarded as it came and counted as "other": callers choose those names, so they never
//!   become metric labels.

use std::collections::{HashMap, HashSet};

pub const APIS: [&str; 2] = ["v1", "v1alpha2"];
const IMAGE_SERVICE: &str = "ImageService";

/// The CRI method table, from the compiled descriptors (given by the Python side).
pub struct Methods {
    by_key: HashMap<String, usize>,
    keys: Vec<String>,
    server_streaming: Vec<bool>,
}

impl Methods {
    /// `methods`: (key such as "RuntimeService/Version", server-streaming) in table order.
    pub fn new(methods: Vec<(String, bool)>) -> Self {
        let mut by_key = HashMap::new();
        let mut keys = Vec::new();
        let mut server_streaming = Vec::new();
        for (i, (key, streaming)) in methods.into_iter().enumerate() {
            by_key.insert(key.clone(), i);
            keys.push(key);
            server_streaming.push(streaming);
        }
        Methods {
            by_key,
            keys,
            server_streaming,
        }
    }

    /// The metrics label slot of paths outside the table.
    pub fn other(&self) -> usize {
        self.keys.len()
    }

    /// Number of label slots, "other" included.
    pub fn slots(&self) -> usize {
        self.keys.len() + 1
    }

    pub fn key(&self, index: usize) -> &str {
        self.keys.get(index).map_or("other", String::as_str)
    }

    pub fn is_server_streaming(&self, index: usize) -> bool {
        self.server_streaming.get(index).copied().unwrap_or(false)
    }
}

/// The APIs one upstream speaks, most preferred first (v1 before v1alpha2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Apis(Vec<&'static str>);

impl Apis {
    /// Unknown names are ignored; an empty set means "not learned yet": callers keep their API.
    pub fn new<S: AsRef<str>>(names: &[S]) -> Self {
        Apis(
            APIS.iter()
                .copied()
                .filter(|a| names.iter().any(|n| n.as_ref() == *a))
                .collect(),
        )
    }

    fn serve(&self, caller: &'static str) -> &'static str {
        if self.0.is_empty() || self.0.contains(&caller) {
            caller
        } else {
            self.0[0]
        }
    }
}

/// What the Python side decides about routing; replaced whole.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub runtime_apis: Apis,
    pub image_apis: Apis,
    /// Method keys whose calls go through the pipeline.
    pub intercepted: HashSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Runtime,
    Image,
}

/// One call's route.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    /// The metrics slot (the method's index, or `Methods::other`).
    pub method: usize,
    pub role: Role,
    /// The path to ask the upstream for; None: the caller's own.
    pub path: Option<String>,
    pub intercepted: bool,
}

struct CriPath<'a> {
    api: &'static str,
    service: &'a str,
    key: &'a str,
}

fn parse(path: &str) -> Option<CriPath<'_>> {
    let rest = path.strip_prefix("/runtime.")?;
    let (api, rest) = rest.split_once('.')?;
    let api = APIS.iter().copied().find(|a| *a == api)?;
    let (service, method) = rest.split_once('/')?;
    if service.is_empty() || service.contains('.') || method.is_empty() || method.contains('/') {
        return None;
    }
    Some(CriPath {
        api,
        service,
        key: rest,
    })
}

pub fn route(methods: &Methods, table: &Table, path: &str) -> Route {
    let Some(cri) = parse(path) else {
        return Route {
            method: methods.other(),
            role: Role::Runtime,
            path: None,
            intercepted: false,
        };
    };
    let role = if cri.service == IMAGE_SERVICE {
        Role::Image
    } else {
        Role::Runtime
    };
    let apis = if role == Role::Image {
        &table.image_apis
    } else {
        &table.runtime_apis
    };
    let api = apis.serve(cri.api);
    let method = methods
        .by_key
        .get(cri.key)
        .copied()
        .unwrap_or(methods.other());
    let known = method != methods.other();
    Route {
        method,
        role,
        path: (api != cri.api).then(|| format!("/runtime.{api}.{}", cri.key)),
        intercepted: known
            && !methods.is_server_streaming(method)
            && table.intercepted.contains(cri.key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods() -> Methods {
        Methods::new(vec![
            ("RuntimeService/Version".into(), false),
            ("RuntimeService/CreateContainer".into(), false),
            ("RuntimeService/GetContainerEvents".into(), true),
            ("ImageService/ListImages".into(), false),
        ])
    }

    fn table(runtime: &[&str], intercepted: &[&str]) -> Table {
        Table {
            runtime_apis: Apis::new(runtime),
            image_apis: Apis::new(runtime),
            intercepted: intercepted.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_caller_keeps_its_api_when_the_runtime_speaks_it() {
        let r = route(
            &methods(),
            &table(&["v1", "v1alpha2"], &[]),
            "/runtime.v1alpha2.RuntimeService/Version",
        );
        assert_eq!(
            r,
            Route {
                method: 0,
                role: Role::Runtime,
                path: None,
                intercepted: false
            }
        );
    }

    #[test]
    fn a_caller_is_bridged_to_the_api_the_runtime_speaks() {
        let m = methods();
        let r = route(
            &m,
            &table(&["v1"], &[]),
            "/runtime.v1alpha2.RuntimeService/Version",
        );
        assert_eq!(
            r.path.as_deref(),
            Some("/runtime.v1.RuntimeService/Version")
        );
        let r = route(
            &m,
            &table(&["v1alpha2"], &[]),
            "/runtime.v1.ImageService/ListImages",
        );
        assert_eq!(
            (r.role, r.path.as_deref()),
            (
                Role::Image,
                Some("/runtime.v1alpha2.ImageService/ListImages")
            )
        );
    }

    #[test]
    fn before_the_runtime_answered_every_caller_keeps_its_api() {
        let r = route(
            &methods(),
            &table(&[], &[]),
            "/runtime.v1alpha2.RuntimeService/Version",
        );
        assert_eq!(r.path, None);
    }

    #[test]
    fn unknown_paths_pass_as_they_are_and_count_as_other() {
        let m = methods();
        let t = table(&["v1"], &["RuntimeService/Version"]);
        for path in [
            "/containerd.services.version.v1.Version/Version",
            "/runtime.v2.RuntimeService/Version",
            "/x",
        ] {
            let r = route(&m, &t, path);
            assert_eq!(
                r,
                Route {
                    method: m.other(),
                    role: Role::Runtime,
                    path: None,
                    intercepted: false
                },
                "{path}"
            );
        }
        // A new method of a known API is still moved between APIs, but never intercepted.
        let r = route(
            &m,
            &table(&["v1"], &["RuntimeService/Future"]),
            "/runtime.v1alpha2.RuntimeService/Future",
        );
        assert_eq!((r.method, r.intercepted), (m.other(), false));
        assert_eq!(r.path.as_deref(), Some("/runtime.v1.RuntimeService/Future"));
    }

    #[test]
    fn only_subscribed_unary_methods_are_intercepted() {
        let m = methods();
        let t = table(
            &["v1"],
            &[
                "RuntimeService/CreateContainer",
                "RuntimeService/GetContainerEvents",
            ],
        );
        assert!(route(&m, &t, "/runtime.v1.RuntimeService/CreateContainer").intercepted);
        assert!(!route(&m, &t, "/runtime.v1.RuntimeService/Version").intercepted);
        assert!(
            !route(&m, &t, "/runtime.v1.RuntimeService/GetContainerEvents").intercepted,
            "streams never"
        );
    }

    #[test]
    fn malformed_cri_paths_are_other() {
        let m = methods();
        let t = table(&["v1"], &[]);
        for path in [
            "/runtime.v1.RuntimeService/",
            "/runtime.v1./Version",
            "/runtime.v1.A.B/C",
            "/runtime.v1.S/M/N",
        ] {
            assert_eq!(route(&m, &t, path).method, m.other(), "{path}");
        }
    }
}

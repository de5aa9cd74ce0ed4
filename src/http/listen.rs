//! Where HTTP is served: the sockets systemd passed for it (named `*http*`), else `[http] listen`. An address
//! other clients can reach (TCP beyond loopback) is refused without an API key; with a key, every TCP
//! listener asks for it.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};

use crate::config::{HttpAddress, HttpConfig};
use crate::server::listener::{self, Listener};
use crate::server::ServerError;

/// Why HTTP cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("[http] listen: {address} is reachable from the network, and no API key is set (api_key_file, or the credential http-api-key)")]
    ExposedWithoutKey { address: String },
    #[error("[http] listen: binding {address}: {message}")]
    Bind { address: String, message: String },
    #[error(transparent)]
    Socket(#[from] ServerError),
}

/// One listening socket of the HTTP API.
pub enum HttpListener {
    Tcp {
        socket: tokio::net::TcpListener,
        addr: SocketAddr,
        /// Clients must send the API key.
        needs_key: bool,
    },
    /// A Unix socket: its file mode and group decide who connects, as for the socket API.
    Unix { socket: Listener },
}

impl HttpListener {
    /// True when requests here must carry the API key.
    pub fn needs_key(&self) -> bool {
        matches!(
            self,
            HttpListener::Tcp {
                needs_key: true,
                ..
            }
        )
    }
}

impl std::fmt::Display for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpListener::Tcp { addr, .. } => write!(f, "http://{addr}"),
            HttpListener::Unix { socket } => match &socket.path {
                Some(p) => write!(f, "unix:{}", p.display()),
                None => f.write_str("unix:(unnamed)"),
            },
        }
    }
}

/// Binds what `cfg` and systemd say. `have_key`: an API key is configured. Call on a tokio runtime.
pub fn bind(cfg: &HttpConfig, have_key: bool) -> Result<Vec<HttpListener>, HttpError> {
    let passed = listener::take_passed(listener::is_http_name)?;
    if !passed.is_empty() {
        return passed
            .into_iter()
            .map(|fd| from_passed(fd, have_key))
            .collect();
    }
    cfg.listen
        .iter()
        .map(|a| match a {
            HttpAddress::Unix(path) => Ok(HttpListener::Unix {
                socket: Listener::create(path, cfg.mode, cfg.group.as_deref(), "http")?,
            }),
            HttpAddress::Tcp(addr) => {
                if a.is_exposed() && !have_key {
                    return Err(HttpError::ExposedWithoutKey {
                        address: a.to_string(),
                    });
                }
                let bind = |e: std::io::Error| HttpError::Bind {
                    address: a.to_string(),
                    message: e.to_string(),
                };
                let std = std::net::TcpListener::bind(addr).map_err(bind)?;
                std.set_nonblocking(true).map_err(bind)?;
                let addr = std.local_addr().map_err(bind)?;
                Ok(HttpListener::Tcp {
                    socket: tokio::net::TcpListener::from_std(std).map_err(bind)?,
                    addr,
                    needs_key: have_key,
                })
            }
        })
        .collect()
}

/// A socket systemd passed: TCP or Unix, told apart by its address family.
fn from_passed(fd: RawFd, have_key: bool) -> Result<HttpListener, HttpError> {
    // SAFETY: an all-zero sockaddr_storage is valid, and getsockname writes at most `len` bytes into it.
    let family = unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return Err(HttpError::Socket(ServerError::Activation(format!(
                "fd {fd}: {}",
                std::io::Error::last_os_error()
            ))));
        }
        ss.ss_family as libc::c_int
    };
    if family == libc::AF_UNIX {
        return Ok(HttpListener::Unix {
            socket: listener::from_passed(fd)?,
        });
    }
    // SAFETY: systemd passed this descriptor to this process, and `take_passed` handed it out once.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let fail =
        |e: std::io::Error| HttpError::Socket(ServerError::Activation(format!("fd {fd}: {e}")));
    std.set_nonblocking(true).map_err(fail)?;
    let addr = std.local_addr().map_err(fail)?;
    if HttpAddress::Tcp(addr).is_exposed() && !have_key {
        return Err(HttpError::ExposedWithoutKey {
            address: format!("{addr} (from systemd)"),
        });
    }
    Ok(HttpListener::Tcp {
        socket: tokio::net::TcpListener::from_std(std).map_err(fail)?,
        addr,
        needs_key: have_key,
    })
}

/// axum serves bitnetd's own Unix listener, which removes its socket file when dropped (after serving).
impl axum::serve::Listener for Listener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.socket.accept().await {
                Ok(c) => return c,
                // Out of descriptors or memory: the next accept may succeed once a connection closes.
                Err(e) => {
                    log::warn!("HTTP Unix socket accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.socket.local_addr()
    }
}

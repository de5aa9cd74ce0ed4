//! The listening socket: taken from systemd (socket activation, `LISTEN_FDS`) when present, else created at the
//! configured path with the configured mode and group, replacing a stale socket left by a crash. A socket
//! bitnetd created is removed when the [`Listener`] is dropped; one systemd passed in is left alone.

use std::io::ErrorKind;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::config::SocketConfig;

use super::ServerError;

/// A bound, listening Unix socket.
pub struct Listener {
    pub socket: tokio::net::UnixListener,
    /// Where clients connect.
    pub path: Option<PathBuf>,
    /// True when systemd passed the socket in.
    pub activated: bool,
    /// The file to remove on drop (device and inode guard against removing a successor's socket).
    owned: Option<(PathBuf, u64, u64)>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.owned {
            let ours =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Listener {
    /// Takes the socket systemd passed (the first of `LISTEN_FDS` not meant for HTTP), else binds `cfg.path`.
    /// Call on a tokio runtime.
    pub fn bind(cfg: &SocketConfig) -> Result<Listener, ServerError> {
        let mut fds = take_passed(|name| !is_http_name(name))?.into_iter();
        if let Some(fd) = fds.next() {
            if fds.len() > 0 {
                log::warn!(
                    "systemd passed {} sockets for the socket API; bitnetd serves the first",
                    fds.len() + 1
                );
            }
            return from_passed(fd);
        }
        create(&cfg.path, cfg.mode, cfg.group.as_deref(), "socket")
    }

    /// Binds a Unix socket at `path` with `mode` and `group` (replacing a stale one); `section` names the
    /// configuration section in errors. Call on a tokio runtime.
    pub fn create(
        path: &Path,
        mode: u32,
        group: Option<&str>,
        section: &str,
    ) -> Result<Listener, ServerError> {
        create(path, mode, group, section)
    }
}

/// True for a passed socket that the HTTP API serves: its name (`FileDescriptorName=`, by default the socket
/// unit's name) contains `http`.
pub fn is_http_name(name: &str) -> bool {
    name.contains("http")
}

/// The sockets systemd passed (`LISTEN_FDS`, `LISTEN_FDNAMES`), read once; each is taken by one server.
type Passed = Result<Vec<(RawFd, String)>, String>;

fn passed() -> &'static Mutex<Passed> {
    static PASSED: OnceLock<Mutex<Passed>> = OnceLock::new();
    PASSED.get_or_init(|| {
        Mutex::new(
            sd_notify::listen_fds_with_names()
                .map(|fds| fds.collect())
                .map_err(|e| e.to_string()),
        )
    })
}

/// Takes the passed sockets whose name `pick` accepts (none taken twice).
pub fn take_passed(pick: impl Fn(&str) -> bool) -> Result<Vec<RawFd>, ServerError> {
    let mut passed = passed().lock().unwrap_or_else(PoisonError::into_inner);
    let all = passed
        .as_mut()
        .map_err(|e| ServerError::Activation(e.clone()))?;
    let (taken, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|(_, name)| pick(name));
    *all = rest;
    Ok(taken.into_iter().map(|(fd, _)| fd).collect())
}

/// A passed Unix socket as a listener.
pub fn from_passed(fd: RawFd) -> Result<Listener, ServerError> {
    // SAFETY: systemd hands this process ownership of the descriptors it lists in LISTEN_FDS, and
    // `listen_fds` checked LISTEN_PID; `take_passed` hands each out once.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let check = |e: std::io::Error| ServerError::Activation(format!("fd {fd}: {e}"));
    std_listener.set_nonblocking(true).map_err(check)?;
    let path = std_listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let socket = tokio::net::UnixListener::from_std(std_listener).map_err(check)?;
    Ok(Listener {
        socket,
        path,
        activated: true,
        owned: None,
    })
}

fn create(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    section: &str,
) -> Result<Listener, ServerError> {
    let err = |what: &str, e: std::io::Error| ServerError::Socket {
        path: path.to_path_buf(),
        message: format!("{what}: {e}"),
    };
    remove_stale(path)?;
    // Bound under a temporary name, given its mode and group, then renamed into place: nobody can connect to
    // it before its permissions are right.
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let socket = tokio::net::UnixListener::bind(&tmp).map_err(|e| err("binding", e))?;
    let prepared = prepare(&tmp, path, mode, group, section)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| err("moving it into place", e)));
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| err("reading it back", e))?;
    Ok(Listener {
        socket,
        path: Some(path.to_path_buf()),
        activated: false,
        owned: Some((path.to_path_buf(), meta.dev(), meta.ino())),
    })
}

/// Gives the socket file at `file` (to be moved to `path`) the configured mode and group.
fn prepare(
    file: &Path,
    path: &Path,
    mode: u32,
    group: Option<&str>,
    section: &str,
) -> Result<(), ServerError> {
    let err = |what: &str, e: std::io::Error| ServerError::Socket {
        path: path.to_path_buf(),
        message: format!("{what}: {e}"),
    };
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("setting its mode", e))?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .map_err(|e| err("looking up its group", e.into()))?
            .ok_or_else(|| ServerError::Socket {
                path: path.to_path_buf(),
                message: format!("group {group:?} does not exist ([{section}] group)"),
            })?
            .gid;
        std::os::unix::fs::chown(file, None, Some(gid.as_raw()))
            .map_err(|e| err(&format!("giving it to group {group:?}"), e))?;
    }
    Ok(())
}

/// Removes a socket file nobody listens on (a crash leftover). A live socket means another bitnetd runs there;
/// a file that is not a socket is never touched.
fn remove_stale(path: &Path) -> Result<(), ServerError> {
    let fail = |message: String| ServerError::Socket {
        path: path.to_path_buf(),
        message,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent.filter(|d| !d.is_dir()) {
                return Err(fail(format!("directory {} does not exist", dir.display())));
            }
            return Ok(());
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    if !meta.file_type().is_socket() {
        return Err(fail("exists and is not a socket; not replacing it".into()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(fail(
            "another process is listening on it (is bitnetd already running?)".into(),
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            log::warn!(path:? = path; "replacing a stale socket");
            std::fs::remove_file(path).map_err(|e| fail(format!("removing the stale socket: {e}")))
        }
        Err(e) => Err(fail(format!("checking whether it is stale: {e}"))),
    }
}

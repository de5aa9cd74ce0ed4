//! The listening socket: taken from systemd (socket activation, `LISTEN_FDS`) when present, else created at the
//! configured path with the configured mode and group, replacing a stale socket left by a crash. A socket
//! bitnetd created is removed when the [`Listener`] is dropped; one systemd passed in is left alone.

use std::io::ErrorKind;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
    /// Takes the socket systemd passed (the first of `LISTEN_FDS`), else binds `cfg.path`. Call on a tokio
    /// runtime.
    pub fn bind(cfg: &SocketConfig) -> Result<Listener, ServerError> {
        if let Some(l) = activated()? {
            return Ok(l);
        }
        create(cfg)
    }
}

fn activated() -> Result<Option<Listener>, ServerError> {
    let mut fds = sd_notify::listen_fds().map_err(|e| ServerError::Activation(e.to_string()))?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if fds.len() > 0 {
        log::warn!(
            "systemd passed {} sockets; bitnetd serves the first",
            fds.len() + 1
        );
    }
    // SAFETY: systemd hands this process ownership of the descriptors it lists in LISTEN_FDS, and
    // `listen_fds` checked LISTEN_PID; nothing else in the process uses them.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let check = |e: std::io::Error| ServerError::Activation(format!("fd {fd}: {e}"));
    std_listener.set_nonblocking(true).map_err(check)?;
    let path = std_listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let socket = tokio::net::UnixListener::from_std(std_listener).map_err(check)?;
    Ok(Some(Listener {
        socket,
        path,
        activated: true,
        owned: None,
    }))
}

fn create(cfg: &SocketConfig) -> Result<Listener, ServerError> {
    let path = &cfg.path;
    let err = |what: &str, e: std::io::Error| ServerError::Socket {
        path: path.clone(),
        message: format!("{what}: {e}"),
    };
    remove_stale(path)?;
    // Bound under a temporary name, given its mode and group, then renamed into place: nobody can connect to
    // it before its permissions are right.
    let mut tmp = path.clone().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let socket = tokio::net::UnixListener::bind(&tmp).map_err(|e| err("binding", e))?;
    let prepared = prepare(&tmp, cfg)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| err("moving it into place", e)));
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| err("reading it back", e))?;
    Ok(Listener {
        socket,
        path: Some(path.clone()),
        activated: false,
        owned: Some((path.clone(), meta.dev(), meta.ino())),
    })
}

/// Gives the socket file at `file` the configured mode and group.
fn prepare(file: &Path, cfg: &SocketConfig) -> Result<(), ServerError> {
    let err = |what: &str, e: std::io::Error| ServerError::Socket {
        path: cfg.path.clone(),
        message: format!("{what}: {e}"),
    };
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(cfg.mode))
        .map_err(|e| err("setting its mode", e))?;
    if let Some(group) = &cfg.group {
        let gid = nix::unistd::Group::from_name(group)
            .map_err(|e| err("looking up its group", e.into()))?
            .ok_or_else(|| ServerError::Socket {
                path: cfg.path.clone(),
                message: format!("group {group:?} does not exist ([socket] group)"),
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

//! systemd's `STATUS=` line while the daemon serves (`systemctl status bitnetd`): what is served where, the
//! board's state from the governor, and the cloud link. One task keeps it current as either changes; nothing
//! else writes `STATUS=` between `READY=1` and `STOPPING=1`.

use tokio::sync::watch;

use crate::governor::Budget;
use crate::router::CloudState;
use crate::systemd::Notifier;

/// The `STATUS=` line: `serving` (the model and where it is served), the governor's summary, the cloud link.
pub fn status_line(serving: &str, board: &Budget, cloud: CloudState) -> String {
    let cloud = match cloud {
        CloudState::Disabled => "cloud off",
        CloudState::Offline => "cloud offline",
        CloudState::Online => "cloud online",
    };
    format!("{serving}; {}; {cloud}", board.summary())
}

/// The status line for the channels' current values (no cloud route: `cloud off`).
pub fn current_line(
    serving: &str,
    board: &watch::Receiver<Budget>,
    cloud: Option<&watch::Receiver<CloudState>>,
) -> String {
    let link = cloud.map_or(CloudState::Disabled, |c| *c.borrow());
    status_line(serving, &board.borrow(), link)
}

/// Sends the status line whenever its text changes from `sent` (the line that went with `READY=1`), until the
/// governor's channel closes. The caller aborts this task (and awaits it) before it sends `STOPPING=1`, so no
/// stale line follows that.
pub async fn publish(
    serving: String,
    sent: String,
    mut board: watch::Receiver<Budget>,
    mut cloud: Option<watch::Receiver<CloudState>>,
) {
    let notify = Notifier;
    let mut last = sent;
    loop {
        let line = current_line(&serving, &board, cloud.as_ref());
        if line != last {
            notify.status(&line);
            last = line;
        }
        tokio::select! {
            r = board.changed() => if r.is_err() { return },
            () = link_changed(&mut cloud) => {}
        }
    }
}

/// Resolves when the cloud link changes; never, when there is no cloud route or its sender is gone.
async fn link_changed(cloud: &mut Option<watch::Receiver<CloudState>>) {
    if let Some(c) = cloud {
        if c.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::policy::{directive, Limits, State, Thermal};

    fn board(thermal: Thermal, temperature_c: Option<f32>) -> Budget {
        let state = State {
            thermal,
            ..State::default()
        };
        Budget {
            directive: directive(&state, &Limits::default()),
            state,
            temperature_c,
            rss_bytes: None,
            mem_available_bytes: None,
            cpu_percent: None,
            power: Default::default(),
        }
    }

    #[test]
    fn the_status_line_names_what_is_served_the_board_and_the_cloud_link() {
        let serving = "serving m on /run/bitnetd/bitnetd.sock (socket activation)";
        let line = status_line(
            serving,
            &board(Thermal::Normal, Some(48.5)),
            CloudState::Online,
        );
        assert!(line.starts_with(serving), "{line}");
        assert!(line.contains("thermal Normal (48.5 °C)"), "{line}");
        assert!(line.ends_with("; cloud online"), "{line}");
        let line = status_line(serving, &board(Thermal::Hot, None), CloudState::Offline);
        assert!(line.contains("thermal Hot (no sensor)"), "{line}");
        assert!(line.ends_with("; cloud offline"), "{line}");
        assert!(
            status_line(serving, &board(Thermal::Normal, None), CloudState::Disabled)
                .ends_with("; cloud off")
        );
    }
}

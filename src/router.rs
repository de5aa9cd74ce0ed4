//! The routing decision: a pure function of the request's routing fields and the state of the cloud, tested
//! case by case. The dispatcher carries it out.

use crate::protocol::{ErrorCode, Route, WireError};

/// What bitnetd knows about the cloud right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudState {
    /// No cloud is configured.
    Disabled,
    /// Configured, but not reachable now.
    Offline,
    /// Configured and reachable.
    Online,
}

/// The routing fields of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRequest {
    pub route: Route,
    pub private: bool,
    pub defer: bool,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Local,
    Cloud,
    /// Kept, and sent to the cloud when it is back.
    Defer,
    Refuse(WireError),
}

/// Decides where `req` runs. Rules, in order:
/// 1. `private` or `route: local`: local, always; a private request never reaches the network.
/// 2. `route: cloud`: the cloud when online; else deferred if `defer` and a cloud is configured; else
///    `cloud_unavailable`.
/// 3. `route: auto`: local.
pub fn decide(req: RouteRequest, cloud: CloudState) -> Decision {
    if req.private || req.route == Route::Local {
        return Decision::Local;
    }
    match (req.route, cloud) {
        (Route::Cloud, CloudState::Online) => Decision::Cloud,
        (Route::Cloud, CloudState::Offline) if req.defer => Decision::Defer,
        (Route::Cloud, CloudState::Offline) => Decision::Refuse(WireError::new(
            ErrorCode::CloudUnavailable,
            "the cloud is unreachable; send `defer: true` to have it forwarded later",
        )),
        (Route::Cloud, CloudState::Disabled) => Decision::Refuse(WireError::new(
            ErrorCode::CloudUnavailable,
            "no cloud is configured on this board",
        )),
        _ => Decision::Local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(route: Route, private: bool, defer: bool) -> RouteRequest {
        RouteRequest {
            route,
            private,
            defer,
        }
    }

    #[test]
    fn private_requests_stay_local_whatever_they_ask() {
        for cloud in [
            CloudState::Disabled,
            CloudState::Offline,
            CloudState::Online,
        ] {
            for route in [Route::Auto, Route::Local, Route::Cloud] {
                assert_eq!(decide(req(route, true, true), cloud), Decision::Local);
            }
        }
    }

    #[test]
    fn local_route_is_local() {
        assert_eq!(
            decide(req(Route::Local, false, false), CloudState::Online),
            Decision::Local
        );
    }

    #[test]
    fn cloud_route_goes_to_the_cloud_when_online() {
        assert_eq!(
            decide(req(Route::Cloud, false, false), CloudState::Online),
            Decision::Cloud
        );
    }

    #[test]
    fn cloud_route_offline_defers_only_when_allowed() {
        assert_eq!(
            decide(req(Route::Cloud, false, true), CloudState::Offline),
            Decision::Defer
        );
        let Decision::Refuse(e) = decide(req(Route::Cloud, false, false), CloudState::Offline)
        else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::CloudUnavailable);
    }

    #[test]
    fn cloud_route_without_a_cloud_is_refused_even_when_deferrable() {
        let Decision::Refuse(e) = decide(req(Route::Cloud, false, true), CloudState::Disabled)
        else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::CloudUnavailable);
    }

    #[test]
    fn auto_runs_locally() {
        for cloud in [
            CloudState::Disabled,
            CloudState::Offline,
            CloudState::Online,
        ] {
            assert_eq!(
                decide(req(Route::Auto, false, false), cloud),
                Decision::Local
            );
        }
    }
}

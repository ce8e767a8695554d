# shellcheck shell=bash
# Source me (bash): `source scripts/env.sh`
#
# Puts this shell in the project's environment, the same one scripts/setup.sh
# builds and scripts/test.sh / scripts/demo.sh run in:
#   - the Python venv ($INFMLLM_VENV, default <repo>/.venv) on PATH;
#   - ROS 2: a distribution you sourced before (ROS_DISTRO set and rclpy
#     importable by the system python3: "system" mode), else the ROS 2 Kilted
#     wheels inside the venv ("wheels" mode);
#   - the colcon install space <repo>/install (if built), which holds the
#     package `infmllm_ros` with its generated msg/srv/action modules;
#   - DDS kept on loopback (config/dds/fastdds_localhost.xml; INFMLLM_DDS_LOCALHOST_ONLY=0
#     for several machines), Fast DDS, and a per-shell ROS_DOMAIN_ID unless set.
# Safe to source twice and from scripts running under `set -euo pipefail`.
# Does not run any installer: that is scripts/setup.sh.

INFMLLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export INFMLLM_ROOT
export INFMLLM_VENV="${INFMLLM_VENV:-$INFMLLM_ROOT/.venv}"

# --- which ROS 2: a sourced distribution or the venv's wheels --------------
if [ -z "${INFMLLM_ROS_MODE:-}" ]; then
  if [ -n "${ROS_DISTRO:-}" ] && command -v python3 >/dev/null 2>&1 \
     && [ "$(command -v python3)" != "$INFMLLM_VENV/bin/python3" ] \
     && python3 -c 'import rclpy' >/dev/null 2>&1; then
    INFMLLM_ROS_MODE=system
  else
    INFMLLM_ROS_MODE=wheels
  fi
fi
export INFMLLM_ROS_MODE

# --- the venv ----------------------------------------------------------------
if [ -x "$INFMLLM_VENV/bin/python" ]; then
  export VIRTUAL_ENV="$INFMLLM_VENV"
  case ":$PATH:" in
    *":$INFMLLM_VENV/bin:"*) ;;
    *) export PATH="$INFMLLM_VENV/bin:$PATH" ;;
  esac
  unset PYTHONHOME
  if [ "$INFMLLM_ROS_MODE" = wheels ]; then
    # The wheels install an ament prefix (share/, lib/, cmake configs) into the venv.
    case ":${AMENT_PREFIX_PATH:-}:" in
      *":$INFMLLM_VENV:"*) ;;
      *) export AMENT_PREFIX_PATH="$INFMLLM_VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}" ;;
    esac
    case ":${CMAKE_PREFIX_PATH:-}:" in
      *":$INFMLLM_VENV:"*) ;;
      *) export CMAKE_PREFIX_PATH="$INFMLLM_VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}" ;;
    esac
  fi
fi

# --- the colcon install space ----------------------------------------------
if [ -f "$INFMLLM_ROOT/install/setup.bash" ]; then
  # colcon's scripts read unset variables; don't let a caller's `set -u` trip them.
  case $- in *u*) _infmllm_had_u=1; set +u ;; *) _infmllm_had_u=0 ;; esac
  # shellcheck disable=SC1091
  source "$INFMLLM_ROOT/install/setup.bash"
  if [ "$_infmllm_had_u" = 1 ]; then set -u; fi
  unset _infmllm_had_u
fi

# --- middleware and discovery ------------------------------------------------
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# A domain of its own per shell (1..100, the range safe from ephemeral ports),
# so concurrent test runs on one machine don't see each other's nodes.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}"
# Keep DDS traffic on loopback unless INFMLLM_DDS_LOCALHOST_ONLY=0 (several machines).
# ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST alone still leaves Fast DDS sockets bound on
# 0.0.0.0 and on the external interface; the shipped Fast DDS profile binds every
# socket to 127.0.0.1, discovers by unicast on loopback and uses shared memory
# between processes. rmw's LOCALHOST range would add its own transports on top of the
# profile's, so with the profile the range is left to the middleware (SYSTEM_DEFAULT).
export INFMLLM_DDS_LOCALHOST_ONLY="${INFMLLM_DDS_LOCALHOST_ONLY:-1}"
if [ "$INFMLLM_DDS_LOCALHOST_ONLY" = 1 ] && [ "$RMW_IMPLEMENTATION" = rmw_fastrtps_cpp ]; then
  _infmllm_dds_profile="$INFMLLM_ROOT/config/dds/fastdds_localhost.xml"
  export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_infmllm_dds_profile}"
  case "${ROS_DISTRO:-}" in  # Fast DDS 2.x (Humble/Iron) reads the older name
    humble|iron) export FASTRTPS_DEFAULT_PROFILES_FILE="${FASTRTPS_DEFAULT_PROFILES_FILE:-$FASTDDS_DEFAULT_PROFILES_FILE}" ;;
  esac
  export ROS_AUTOMATIC_DISCOVERY_RANGE=SYSTEM_DEFAULT
  unset _infmllm_dds_profile
elif [ "$INFMLLM_DDS_LOCALHOST_ONLY" = 1 ]; then
  # Another middleware: its own localhost setting (Jazzy and newer; Humble/Iron: ROS_LOCALHOST_ONLY).
  export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
  case "${ROS_DISTRO:-}" in
    humble|iron) export ROS_LOCALHOST_ONLY="${ROS_LOCALHOST_ONLY:-1}" ;;
  esac
else
  export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-SUBNET}"
fi

// The pod sandbox's process for the testbed's real node (no registry to pull a pause image from).
module relaunch.dev/testbed/pause

go 1.26.0

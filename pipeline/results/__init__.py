"""What runs leave behind: the content-addressed artifact cache, the results database and the device-lab
dashboard."""
